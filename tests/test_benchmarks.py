"""Smoke tests of benchmarks/*.py: each script runs as a subprocess on a tiny random BERT for one
step and prints JSON records with the documented fields. No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TINY = ["--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0"]

pytestmark = pytest.mark.xdist_group("benchmarks")


def run(script: str, *args: str, timeout: int = 240) -> list[dict]:
    """Runs benchmarks/<script> and returns its JSON records (every stdout line must be one)."""
    # Unoptimised LLVM code generation: compiles about twice as fast, and no timing is checked here.
    xla_flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", XLA_FLAGS=xla_flags)
    # No persistent compile cache here: an executable loaded from it prints other HLO text, and
    # infer.py compares the merged model's program with the plain one's.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr[-3000:]
    return [json.loads(line) for line in lines]


def by(records, **match):
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


ENV_FIELDS = ("platform", "device_kind", "cpu", "cores", "versions", "date")


def test_step_reports_every_field_and_the_method_ratio():
    records = run("step.py", *TINY, "--method", "spafit", "full", "--matmul-n", "64")
    spafit, full = (by(records, benchmark="step", method=m)[0] for m in ("spafit", "full"))
    for r in (spafit, full):
        assert r["impl"] == "spafit_jax"
        for key in ("compile_s", "step_s_median", "examples_per_s", "flops_per_step", "flops_per_s",
                    "matmul_peak_flops_per_s", "fraction_of_matmul_peak", "trainable_bytes", "opt_state_bytes",
                    "peak_host_rss_bytes", *ENV_FIELDS):
            assert r[key] is not None, key
        assert r["flops_per_step"] > 0 and r["step_s_median"] > 0 and len(r["step_s"]) == 1
        assert r["versions"]["jax"]
    assert (spafit["n1"], spafit["n2"], spafit["num_layers"]) == (1, 2, 3)
    assert spafit["opt_state_bytes"] < full["opt_state_bytes"] == full["opt_state_bytes_full"]
    assert spafit["opt_state_fraction_of_full"] == pytest.approx(spafit["opt_state_bytes"] / full["opt_state_bytes"])
    assert spafit["flops_per_step"] < full["flops_per_step"]  # the pruned backward
    assert full["trainable_params"] == full["total_params"]
    (ratio,) = by(records, benchmark="step_ratio")
    assert (ratio["a"], ratio["b"]) == ("spafit/jax", "full/jax")
    assert len(ratio["pair_ratios"]) == 1 and ratio["median_ratio"] > 0


@pytest.mark.reference
def test_step_vs_torch_runs_the_same_model_and_plan():
    records = run("step.py", *TINY, "--method", "spafit", "--vs-torch", "--matmul-n", "64")
    for method in ("spafit",):
        ours = by(records, benchmark="step", method=method, impl="spafit_jax")[0]
        theirs = by(records, benchmark="step", method=method, impl="torch+peft")[0]
        assert theirs["same_trainable_params"] and theirs["trainable_params"] == ours["trainable_params"]
        assert theirs["max_abs_logit_diff_vs_ours"] < 1e-4
        assert theirs["opt_state_bytes"] > 0 and theirs["threads"] >= 1
        assert theirs["versions"]["peft"] and theirs["torch_matmul_peak_flops_per_s"] > 0
        (ratio,) = by(records, benchmark="step_ratio", a=f"{method}/jax", b=f"{method}/torch")
        assert ratio["median_ratio"] > 0


def test_infer_merged_model_matches_unmerged_and_has_no_adapters():
    records = run("infer.py", *TINY)
    variants = {r["variant"]: r for r in by(records, benchmark="infer")}
    assert set(variants) == {"plain", "merged", "unmerged", "plain_control"}
    assert variants["merged"]["lora_leaves"] == 0 < variants["unmerged"]["lora_leaves"]
    assert variants["merged"]["same_program_as_plain"] and not variants["unmerged"]["same_program_as_plain"]
    assert variants["merged"]["max_abs_logit_diff_vs_unmerged"] < 1e-4
    assert variants["merged"]["flops_per_call"] == variants["plain"]["flops_per_call"]
    assert all(v["examples_per_s"] > 0 and v["call_s_median"] > 0 for v in variants.values())
    assert {(r["a"], r["b"]) for r in by(records, benchmark="infer_ratio")} == {
        ("merged", "plain"), ("unmerged", "plain"), ("plain_control", "plain")}


def test_pipeline_reports_stages_and_step():
    records = run("pipeline.py", *TINY, "--limit", "24", "--repeats", "1")
    stages = {r["stage"]: r for r in by(records, benchmark="pipeline")}
    assert set(stages) == {"read", "tokenize", "cache_load", "batch"}
    assert stages["tokenize"]["examples"] == 24 and stages["batch"]["examples"] == 24
    assert all(s["examples_per_s"] > 0 for s in stages.values())
    (vs,) = by(records, benchmark="pipeline_vs_step")
    assert vs["step_examples_per_s"] > 0 and vs["tokenize_over_step"] > 0 and vs["batch_over_step"] > 0


def _import(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.reference
@pytest.mark.parametrize("method", ["full", "bitfit", "lora", "spafit"])
def test_torch_peer_trains_what_our_plan_trains(method):
    step = _import("step")
    from spafit_jax import masking

    built = step.common.build("tiny", method)
    model = step.torch_model(built, method, num_labels=2, rank=8, alpha=16.0)
    counts = masking.count_params(built.params, built.plan.labels)
    ours = {k: v for k, v in counts.items() if k != "frozen"}
    theirs = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(theirs.values()) == sum(ours.values())
    assert sum(v for n, v in theirs.items() if "lora_" in n) == ours.get("lora", 0)
    assert not any("embeddings" in n for n in theirs) or method == "full"
    assert not any("LayerNorm" in n for n in theirs) or method == "full"
    if method == "spafit":  # layers below n1 train nothing; LoRA only from n2
        layers = {int(m.group(1)) for n in theirs if (m := step._LAYER.search(n))}
        lora_layers = {int(m.group(1)) for n in theirs if "lora_" in n and (m := step._LAYER.search(n))}
        assert min(layers) == built.plan.n1 and min(lora_layers) == built.plan.n2


def test_isolate_runs_one_process_per_method(monkeypatch):
    step = _import("step")
    calls = []
    monkeypatch.setattr(step.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    argv = ["--model", "tiny", "--method", "spafit", "full", "--isolate", "--steps", "3"]
    assert step.main(argv) == 0
    assert [c[2:] for c in calls] == [["--model", "tiny", "--steps", "3", "--method", m] for m in ("spafit", "full")]


def test_strata_arguments_are_counts_or_fractions():
    common = _import("common")
    assert common.strata_arg("4") == 4 and isinstance(common.strata_arg("4"), int)
    assert common.strata_arg("0.5") == 0.5 and common.strata_arg("1.0") == 1.0


@pytest.mark.reference
def test_epoch_runs_the_trainer_and_the_torch_peer_on_real_pairs():
    records = run("epoch.py", "--task", "pairs", "--model", "minilm", "--limit-train", "32", "--limit-eval", "16",
                  "--max-length", "32", "--batch", "8", "--eval-batch", "16", "--pairs-train", "48",
                  "--pairs-eval", "16", "--variants", "plain", "grouped", "--torch", "--epochs", "2",
                  "--max-shapes", "2")
    (data,) = by(records, benchmark="epoch_data")
    assert (data["train_examples"], data["eval_examples"]) == (32, 16) and data["mean_tokens_train"] > 10
    assert data["pairs"]["train_pairs"] == 48
    plain, grouped = (by(records, benchmark="epoch", impl="spafit_jax", variant=v)[0] for v in ("plain", "grouped"))
    (theirs,) = by(records, benchmark="epoch", impl="torch+peft")
    for r in (plain, grouped, theirs):
        for key in ("train_s", "eval_s", "epoch_plus_eval_s", "wall_s", "examples_per_s", "padding_efficiency",
                    "tokens_per_s", "train_tokens_real", "loadavg_1m_start", "loadavg_1m_end", *ENV_FIELDS):
            assert r[key] is not None, key
        assert r["steps"] == 2 * r["steps_per_epoch"] == 8 and r["epochs"] == 2 and r["train_s"] > 0 and 0 < r["padding_efficiency"] <= 1
        assert 0 <= r["eval"]["accuracy"] <= 1
    for r in (plain, grouped):
        assert r["compile_s"] > 0 and r["compiled_shapes"] >= 1
        assert r["padding_efficiency"] == pytest.approx(r["padding_efficiency_computed"])
    assert grouped["padding_efficiency"] >= plain["padding_efficiency"]
    assert plain["buckets"] == [8, 16, 32] and grouped["buckets"][-1] == 32 and grouped["compiled_shapes"] <= 2
    assert "data.max_shapes=2" in grouped["overrides"]
    assert theirs["trainable_params"] == plain["trainable_params"] and theirs["threads"] >= 1
    ratios = {r["a"]: r for r in by(records, benchmark="epoch_ratio")}
    assert set(ratios) == {"ours/plain", "ours/grouped"}
    assert all(r["b"] == "torch/grouped" and r["epoch_plus_eval_ratio"] > 0 for r in ratios.values())


def test_step_times_spafit_with_the_frozen_stratum_cache():
    records = run("step.py", *TINY, "--method", "full", "spafit", "spafit_cached", "--matmul-n", "64")
    spafit, cached = (by(records, benchmark="step", method=m)[0] for m in ("spafit", "spafit_cached"))
    assert cached["impl"] == "spafit_jax" and (cached["n1"], cached["n2"]) == (spafit["n1"], spafit["n2"])
    assert cached["trainable_params"] == spafit["trainable_params"]
    assert cached["opt_state_bytes"] == spafit["opt_state_bytes"] and cached["compile_s"] > 0
    assert 0 < cached["flops_per_step"] < spafit["flops_per_step"]  # the frozen layers' forward is gone
    for b in ("full", "spafit"):
        (ratio,) = by(records, benchmark="step_ratio", a="spafit_cached/jax", b=f"{b}/jax")
        assert ratio["median_ratio"] > 0


def test_packing_runs_packed_grouped_and_torch_and_predicts_against_the_pipeline():
    records = run("packing.py", "--tasks", "tweets", "--model", "minilm", "--limit-train", "32", "--limit-eval", "16",
                  "--max-length", "32", "--batch", "8", "--eval-batch", "16", "--predict-texts", "40",
                  "--predict-batch", "16", timeout=900)
    (data,) = by(records, benchmark="packing_data")
    assert (data["train_examples"], data["eval_examples"]) == (32, 16) and not data["pair"]
    grouped, packed = (by(records, benchmark="packing_epoch", impl="spafit_jax", variant=v)[0]
                       for v in ("grouped", "packed"))
    (theirs,) = by(records, benchmark="packing_epoch", impl="torch+peft")
    for r in (grouped, packed, theirs):
        assert 0 < r["real_token_fraction_train"] <= 1 and 0 < r["real_token_fraction_eval"] <= 1, r["variant"]
        assert r["train_s"] > 0 and r["eval_s"] > 0 and r["cpu"] and r["cores"] >= 1
    assert packed["train_shapes"] == packed["eval_shapes"] == 1 and packed["packing"]["max_segments"] >= 1
    assert grouped["train_shapes"] >= 1 and packed["real_token_fraction_eval"] > grouped["real_token_fraction_eval"]
    assert {r["a"] for r in by(records, benchmark="packing_ratio")} == {"ours/grouped", "ours/packed"}
    predicted = {r["variant"]: r for r in by(records, benchmark="predict")}
    assert set(predicted) == {"unpacked", "packed", "dynamic padding"}
    assert all(r["texts"] == 40 and r["warm_s"] > 0 for r in predicted.values())
    ratios = by(records, benchmark="predict_ratio")
    assert {r["a"] for r in ratios} == {"ours/unpacked", "ours/packed"}
    # the exported run predicts the same classes through transformers (float32 on both sides)
    assert all(r["same_class_fraction"] >= 0.95 for r in ratios)
