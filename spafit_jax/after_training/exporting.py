"""The work behind `python -m spafit_jax.export` (its command line and --help: `spafit_jax/export.py`).

- `hf`: a merged PyTorch-transformers folder (LoRA folded into the kernels): config.json with
  id2label / label2id (problem_type for regression), model.safetensors in PyTorch names, the
  tokenizer. `AutoModelForSequenceClassification.from_pretrained(DIR)` loads it.
- `peft`: adapter_config.json + adapter_model.safetensors for `PeftModel.from_pretrained(base, DIR)`:
  the LoRA adapters as trained (layers_to_transform, target_modules, rank_pattern, use_rslora),
  the trained biases (`bias="all"`), and whole copies (`modules_to_save`) of the head, the pooler and each
  norm module whose scale trains (ModernBERT's norm scales standing in for biases, `train_layernorm`).
- `flax`: config.json + flax_model.msgpack (merged) + tokenizer, for `hf.load_pretrained(DIR)`.

DIR must be new or empty, or an earlier export (it holds `.spafit-export.json`), which `--overwrite`
replaces whole: the new export is written beside it and swapped in, the old one deleted only then.
Never the run folder, the run's base model or any other folder of files that no export wrote.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import json
import os
import time
from pathlib import Path
from typing import Any

from spafit_jax.models import families, hf, weights
from spafit_jax.after_training import outputs
from spafit_jax.errors import ConfigError
from spafit_jax.methods import BIAS, HEAD, POOLER
from spafit_jax.models.peft_io import PEFT_CONFIG, PEFT_WEIGHTS, peft_norms, peft_parts, peft_state, to_peft_config

FORMATS = ("hf", "peft", "flax")


def label_fields(spec) -> dict[str, Any]:
    """config.json fields naming the labels: num_labels, id2label, label2id, problem_type."""
    n = spec.num_labels
    names = list(spec.label_names) if spec.label_names else [f"LABEL_{i}" for i in range(n)]
    return {"num_labels": n, "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)},
            "problem_type": "regression" if spec.is_regression else "single_label_classification"}


def base_model_name(name: str) -> str:
    """A name others can load: a hub id as it is; an alias or local folder as its absolute path."""
    if name in hf.ALIASES or Path(name).expanduser().exists():
        return str(hf.resolve(name).resolve())
    return name


def export_hf(run, out: Path) -> Path:
    """Writes a merged PyTorch transformers folder (see the module docstring) into `out` as it is; `export`
    checks and prepares `out`."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((hf.resolve(run.config.model.name) / "config.json").read_text())
    raw.update(label_fields(run.spec), architectures=[families.get(raw.get("model_type", "bert")).architecture])
    raw.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    save_file(weights.to_torch_names(run.merged_params()), str(out / weights.SAFETENSORS), metadata={"format": "pt"})
    run.tokenizer.save_pretrained(str(out))
    return out


def export_flax(run, out: Path) -> Path:
    """Writes a merged folder our `hf.load_pretrained` reads (config.json, flax_model.msgpack, tokenizer) into
    `out` as it is; `export` checks and prepares `out`."""
    config = hf.read_config(hf.resolve(run.config.model.name))
    hf.save_pretrained(out, config, run.merged_params(), num_labels=run.spec.num_labels,
                       extra=label_fields(run.spec))
    run.tokenizer.save_pretrained(str(out))
    return out


def export_peft(run, out: Path) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors (see the module docstring) into `out` as it is;
    `export` checks and prepares `out`."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    model_config = hf.read_config(hf.resolve(run.config.model.name))
    bias, modules = peft_parts(run.plan, model_config.model_type)
    norms = peft_norms(run.plan, model_config.model_type)
    labels = {"/".join(k): v for k, v in flatten_dict(run.plan.labels).items()}
    # a trained norm module whole: its untrained leaves (a frozen bias) as the base has them, which is exact
    keep = {p for p, label in labels.items() if label in (BIAS, HEAD, POOLER) or p.rsplit("/", 1)[0] in norms}
    config = to_peft_config(run.plan.lora, run.plan.num_layers, bias=bias, modules_to_save=modules,
                            base_model=base_model_name(run.config.model.name), model_type=model_config.model_type)
    out.mkdir(parents=True, exist_ok=True)
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(peft_state(run.params, keep.__contains__), str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    run.tokenizer.save_pretrained(str(out))
    return out


def protected(workdir: str | os.PathLike, model_name: str | None = None) -> dict[str, dict[Path, str]]:
    """`outputs.check_folder`'s `protected` and `sealed` folders of the run in `workdir` trained on
    `model_name` (None: the one its config.yaml names, where readable): `outputs.run_places`."""
    return outputs.run_places(workdir, model_name).export_kwargs()


def export(run, out: str | os.PathLike, fmt: str, *, overwrite: bool = False) -> Path:
    """Writes the reloaded run `run` (`run.load_run`) to folder `out` in format hf, peft or flax.

    `out` must be new or empty, or (with `overwrite`) an earlier export, which is replaced whole once
    the new one is complete; an OutputError (one line) says why not, before anything is written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; use one of {' | '.join(FORMATS)}")
    path = outputs.check_folder(out, overwrite=overwrite, **protected(run.workdir, run.config.model.name))
    if fmt == "peft":  # refused before anything is written
        peft_parts(run.plan, hf.read_config(hf.resolve(run.config.model.name)).model_type)
    marker = {"format": fmt, "workdir": str(Path(run.workdir).resolve()), "step": run.step,
              "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    build = {"hf": export_hf, "peft": export_peft, "flax": export_flax}[fmt]
    return outputs.replace_folder(path, lambda folder: build(run, folder), marker)
