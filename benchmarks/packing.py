"""Sequence-packing benchmark (issue 29): an epoch + evaluation packed against today's defaults and PyTorch,
and `predict` packed against unpacked and transformers' pipeline, in one run on this CPU.

    python benchmarks/packing.py --tasks tweets bbc_news pairs --limit-train 2000 --limit-eval 500
    python benchmarks/packing.py --tasks tweets --predict-texts 10000 --no-torch

For each task (`tweets`, `bbc_news`, `pairs`: `epoch.build_pairs`' sentence pairs from BBC News) the
trainer runs one epoch and one evaluation (`epoch.run_ours`) twice: `grouped` (today's defaults: length
grouping, bucket lengths fitted to the batches) and `packed` (`data.packing=true`), then the PyTorch +
PEFT peer with dynamic padding and Hugging Face length grouping (`epoch.run_torch`). Each `packing_epoch`
record has the real-token fraction of training (results.json's `padding_efficiency`: real tokens over
the tokens the steps computed) and of evaluation (`aot_epoch`'s batches of the evaluation lengths, which
`tests/test_aot_epoch.py` checks against the trainer's), the compiled train and eval shapes, train seconds
with the steps that compiled apart, and eval seconds (its compiles included: the trainer does not time
them apart). `packing_ratio` records: each of ours over torch.

`predict`: `--predict-texts` tweets (the corpus' texts in order, repeated if it has fewer) through the
packed run's `run.load_run(...).logits`, unpacked (`data.packing=false`: buckets fitted to the batches)
and packed (the first call compiles; the second is timed warm), and through
`transformers.pipeline("text-classification")` on the run exported by `exporting.export_hf` (same model
and weights, torch threads = cores, the same batch size). `predict_ratio`: ours over the pipeline, and
the share of texts whose predicted class agrees.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import epoch  # noqa: E402
import numpy as np  # noqa: E402

from spafit_jax.tpu import epoch as aot_epoch  # noqa: E402
from spafit_jax.config import files as config_lib  # noqa: E402
from spafit_jax.models import hf  # noqa: E402

TASKS = ("tweets", "bbc_news", "pairs")


def epoch_args(args, task: str):
    """epoch.py's arguments for one task (its defaults, with this run's sizes)."""
    return epoch.parse(["--task", task, "--model", args.model, "--method", args.method, "--max-length",
                        str(args.max_length), "--batch", str(args.batch), "--eval-batch", str(args.eval_batch),
                        "--pairs-train", str(args.pairs_train), "--pairs-eval", str(args.pairs_eval),
                        "--seed", str(args.seed),
                        *(["--limit-train", str(args.limit_train)] if args.limit_train else []),
                        *(["--limit-eval", str(args.limit_eval)] if args.limit_eval else [])])


def eval_shapes(cfg, train: np.ndarray, evl: np.ndarray, packed: bool) -> tuple[int, float]:
    """(compiled eval shapes, real-token fraction) of the evaluation batches the trainer cuts (1 device; the
    buckets are fitted to the train batches, as the trainer fits them)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packed))
    fn = aot_epoch.packed_batches if packed else aot_epoch.bucketed_batches
    plan = fn(cfg, train, evl, devices=1)
    return len(plan["shapes"]["eval"]), plan["real_token_fraction"]["eval"]


def run_task(args, task_name: str, root: Path, env: dict) -> dict:
    """The three epoch runs of one task; returns the packed run's record (its run folder predicts)."""
    from spafit_jax.data import pipeline as data

    eargs = epoch_args(args, task_name)
    data_dir = None
    if task_name == "pairs":
        data_dir = root / "pairs"
        data_dir.mkdir(exist_ok=True)
        epoch.build_pairs(data_dir, args.pairs_train, args.pairs_eval, seed=0)
    base = epoch.task_overrides(eargs, data_dir)
    cfg = config_lib.load_config([], base)
    task = data.load_task_data(cfg.data, hf.load_tokenizer(hf.resolve(cfg.model.name)), seed=cfg.train.seed)
    tr, ev = task.train, next(iter(task.evals.values()))
    common.emit({**env, "benchmark": "packing_data", "task": task_name, "train_examples": len(tr),
                 "eval_examples": len(ev), "max_length": args.max_length, "mean_tokens_train": float(tr.lengths.mean()),
                 "mean_tokens_eval": float(ev.lengths.mean()), "pair": task.spec.text_b is not None})
    out = {}
    for variant in ("grouped", "packed"):
        rec = epoch.run_ours(eargs, base, variant, root)
        cfg_v = config_lib.load_config([], base + epoch.variant_overrides(variant))
        shapes, frac = eval_shapes(cfg_v, tr.lengths.astype(np.int64), ev.lengths.astype(np.int64), variant == "packed")
        out[variant] = {**env, **rec, "benchmark": "packing_epoch", "task": task_name, "model": args.model,
                        "real_token_fraction_train": rec["padding_efficiency"], "real_token_fraction_eval": frac,
                        "train_shapes": rec["compiled_shapes"], "eval_shapes": shapes,
                        "train_compile_s": rec["compile_s"], "eval_s_includes_compile": True}
        common.emit(out[variant])
    if args.torch:
        built = common.build(args.model, args.method, num_labels=task.spec.num_labels, seed=args.seed)
        theirs = epoch.run_torch(eargs, task, built, "grouped")
        theirs = {**env, **theirs, "benchmark": "packing_epoch", "task": task_name, "model": args.model,
                  "real_token_fraction_train": theirs["padding_efficiency"],
                  "real_token_fraction_eval": theirs["eval_padding_efficiency"]}
        common.emit(theirs)
        for variant, rec in out.items():
            common.emit({"benchmark": "packing_ratio", "task": task_name, "a": f"ours/{variant}", "b": "torch/grouped",
                         "epoch_plus_eval_ratio": rec["epoch_plus_eval_s"] / theirs["epoch_plus_eval_s"],
                         "train_ratio": rec["train_s"] / theirs["train_s"],
                         "train_without_compile_ratio": rec["train_s_without_compile"] / theirs["train_s"],
                         "eval_ratio": rec["eval_s"] / theirs["eval_s"], "loadavg_1m_end": common.load_average()})
    return out["packed"]


def predict_texts(n: int) -> list[str]:
    """`n` tweets: the corpus' texts in order, repeated when it has fewer."""
    from spafit_jax.data import tweets

    texts = tweets.read_tweets()[0]
    return [texts[i % len(texts)] for i in range(n)]


def run_predict(args, workdir: str, root: Path, env: dict) -> None:
    """Ours unpacked and packed (cold, then warm) against the transformers pipeline on `--predict-texts` tweets."""
    from spafit_jax.after_training import exporting
    from spafit_jax.after_training import run as run_lib

    texts = predict_texts(args.predict_texts)
    loaded = run_lib.load_run(workdir, checkpoint="last")
    timings, preds = {}, {}
    for variant, packed in (("unpacked", False), ("packed", True)):
        cfg = dataclasses.replace(loaded.config, data=dataclasses.replace(loaded.config.data, packing=packed))
        r = dataclasses.replace(loaded, config=cfg, _logits_fn=None)
        load0 = common.load_average()
        t0 = time.perf_counter()
        r.logits(texts, batch_size=args.predict_batch)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        preds[variant] = r.logits(texts, batch_size=args.predict_batch).argmax(-1)
        warm = time.perf_counter() - t0
        timings[variant] = warm
        common.emit({**env, "benchmark": "predict", "impl": "spafit_jax", "variant": variant, "texts": len(texts),
                     "batch_size": args.predict_batch, "cold_s": cold, "warm_s": warm, "texts_per_s": len(texts) / warm,
                     "loadavg_1m_start": load0, "loadavg_1m_end": common.load_average()})
    if args.pipeline:
        import torch
        from transformers import pipeline

        folder = exporting.export_hf(loaded, root / "hf-export")
        pipe = pipeline("text-classification", model=str(folder), tokenizer=str(folder), device=-1)
        pipe(texts[:args.predict_batch], batch_size=args.predict_batch)  # warm-up
        load0 = common.load_average()
        t0 = time.perf_counter()
        got = pipe(texts, batch_size=args.predict_batch, truncation=True, max_length=loaded.config.data.max_length)
        seconds = time.perf_counter() - t0
        label2id = pipe.model.config.label2id
        theirs = np.asarray([label2id[g["label"]] for g in got])
        common.emit({**env, "benchmark": "predict", "impl": "transformers.pipeline", "variant": "dynamic padding",
                     "texts": len(texts), "batch_size": args.predict_batch, "warm_s": seconds,
                     "texts_per_s": len(texts) / seconds, "threads": torch.get_num_threads(),
                     "loadavg_1m_start": load0, "loadavg_1m_end": common.load_average()})
        for variant, s in timings.items():
            common.emit({"benchmark": "predict_ratio", "a": f"ours/{variant}", "b": "transformers.pipeline",
                         "warm_ratio": s / seconds, "same_class_fraction": float((preds[variant] == theirs).mean())})


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--model", default="minilm")
    p.add_argument("--method", default="spafit", choices=common.METHODS)
    p.add_argument("--limit-train", type=int, default=2000)
    p.add_argument("--limit-eval", type=int, default=500)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--pairs-train", type=int, default=2000)
    p.add_argument("--pairs-eval", type=int, default=500)
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True, help="the PyTorch + PEFT peer")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--predict-texts", type=int, default=10000, help="tweets to predict (0: no predict runs); "
                   "needs tweets in --tasks (its packed run predicts)")
    p.add_argument("--predict-batch", type=int, default=64)
    p.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers' pipeline on the exported run")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    warnings.filterwarnings("ignore", message=".*donated.*")
    if args.torch or args.pipeline:
        import torch

        torch.set_num_threads(args.torch_threads or common.cpu_cores())
    env = common.environment(with_torch=args.torch or args.pipeline)
    with tempfile.TemporaryDirectory(prefix="spafit-packing-") as tmp:
        root = Path(tmp)
        for t in args.tasks:
            packed = run_task(args, t, root, env)
            if t == "tweets" and args.predict_texts:  # right after: its packed run predicts
                run_predict(args, packed["workdir"], root, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
