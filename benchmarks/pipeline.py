"""Input-pipeline benchmark: tokenisation and batching (tokens.py, batching.py) on BBC News vs the train step.

    python benchmarks/pipeline.py --model minilm --method spafit --batch 16 --seq 128

Stages, each timed `--repeats` times (median): reading the articles, tokenising them (fast
tokenizer, batched, cache off), loading the token cache, and cutting one epoch of bucketed
train batches. Then our train step runs on real BBC batches of the same size. Prints one
`pipeline` record per stage and a `pipeline_vs_step` record: each stage's examples/s over the
step's examples/s (above 1, the stage keeps the step fed; tokenisation happens once per run,
batching every epoch).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import step as step_bench  # noqa: E402

from spafit_jax.data import batching, bbc_news, sources, tasks, tokens  # noqa: E402
from spafit_jax.models import hf


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--method", default="spafit", choices=common.METHODS, help="method of the train step compared")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / alias (default: --model's, minilm for random configs)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N articles")
    p.add_argument("--repeats", type=int, default=3, help="timings per pipeline stage (median)")
    p.add_argument("--no-step", action="store_true", help="skip the train-step comparison")
    return p.parse_args(argv)


def timed_median(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return common.median(times), times, out


def main(argv=None) -> int:
    args = parse(argv)
    warnings.filterwarnings("ignore", message=".*donated.*")
    env = common.environment()
    tok_name = args.tokenizer or ("minilm" if args.model in common.RANDOM_MODELS else args.model)
    tokenizer = hf.load_tokenizer(tok_name)
    base = {"benchmark": "pipeline", "dataset": "bbc_news", "tokenizer": str(tok_name), "max_length": args.seq,
            "batch": args.batch, "repeats": args.repeats,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset (library default)")}

    def read():
        texts, labels, _ = bbc_news.read_articles()
        if args.limit:
            texts, labels = texts[:args.limit], labels[:args.limit]
        return sources.Examples(texts, None, labels)

    stages: dict[str, dict] = {}
    sec, times, ex = timed_median(read, args.repeats)
    n = len(ex)
    stages["read"] = {"seconds": sec, "all_seconds": times}
    sec, times, enc = timed_median(lambda: tokens.encode(tokenizer, ex, max_length=args.seq, cache=False), args.repeats)
    stages["tokenize"] = {"seconds": sec, "all_seconds": times,
                          "mean_tokens": float(enc.lengths.mean()),
                          "truncated_fraction": float((enc.lengths >= args.seq).mean())}
    with tempfile.TemporaryDirectory() as cache:
        old = os.environ.get("SPAFIT_CACHE")
        os.environ["SPAFIT_CACHE"] = cache
        try:
            tokens.encode(tokenizer, ex, max_length=args.seq)  # writes the cache
            sec, times, _ = timed_median(lambda: tokens.encode(tokenizer, ex, max_length=args.seq), args.repeats)
        finally:
            if old is None:
                os.environ.pop("SPAFIT_CACHE", None)
            else:
                os.environ["SPAFIT_CACHE"] = old
    stages["cache_load"] = {"seconds": sec, "all_seconds": times, "note": "hashes the texts, then loads the .npz"}
    buckets = batching.default_buckets(args.seq)

    def epoch():
        return list(batching.train_batches(enc, args.batch, seed=args.seed, epoch=0, buckets=buckets))

    sec, times, batches = timed_median(epoch, args.repeats)
    used = len(batches) * args.batch
    stages["batch"] = {"seconds": sec, "all_seconds": times, "examples": used, "buckets": buckets,
                       "bucket_counts": {str(b): sum(x["input_ids"].shape[1] == b for x in batches) for b in buckets}}
    eps = {}
    for name, st in stages.items():
        count = st.pop("examples", n)
        eps[name] = count / st["seconds"]
        common.emit({**base, "stage": name, "examples": count, "examples_per_s": eps[name], **st, **env})
    if args.no_step:
        return 0

    # The train step on real batches of the longest bucket (what most BBC batches are).
    full = [b for b in batches if b["input_ids"].shape[1] == args.seq] or batches
    built = common.build(args.model, args.method, num_labels=tasks.get_task("bbc_news").num_labels, dtype=args.dtype,
                         n1=args.n1, n2=args.n2, rank=args.rank, alpha=args.alpha, seed=args.seed)
    runner = step_bench.jax_runner(built, full[0], args.seed)
    times = common.round_robin({"step": runner.run}, args.steps, args.warmup, args.gap)["step"]
    step_s = common.median(times)
    step_eps = args.batch / step_s
    common.emit({"benchmark": "pipeline_vs_step", "model": args.model, "method": args.method, "dtype": args.dtype,
                 "batch": args.batch, "seq": full[0]["input_ids"].shape[1], "step_s_median": step_s, "step_s": times,
                 "step_examples_per_s": step_eps, "compile_s": runner.info["compile_s"],
                 **{f"{name}_examples_per_s": v for name, v in eps.items()},
                 **{f"{name}_over_step": v / step_eps for name, v in eps.items()}, **env})
    return 0


if __name__ == "__main__":
    sys.exit(main())
