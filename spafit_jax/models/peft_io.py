"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors), both ways: the one owner.

Our `LoRAConfig` as PEFT's LoraConfig writes it (`to_peft_config`) and back (`from_peft_config`,
refusing in one line what our LoRA cannot express); the adapter tensors in PEFT's names
(`peft_state`) and back (`from_peft_state`); reading and checking a folder (`read_peft`,
`check_peft_config`); what an export carries besides the adapters (`peft_parts`, `peft_norms`).
`hf.load_pretrained(adapter=DIR)` reads with it, `export --format peft` writes with it. Imports the
encoder table (`families`) and weight names (`weights`), never a model or the trainer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from spafit_jax.models import families
from spafit_jax.errors import ConfigError, LoadError
from spafit_jax.methods import BIAS, HEAD, LAYERNORM, LORA, LORA_TARGETS as TARGETS, POOLER, WEIGHT, LoRAConfig
from spafit_jax.models.weights import to_torch_names

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def read_json(path: Path) -> dict:
    """A JSON file's contents; a one-line LoadError when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path} is not readable JSON ({e}); re-save the folder") from None


#: our LoRA target -> its module inside `bert.encoder.layer.<i>` (PyTorch names); other families: `_peft_modules`
PEFT_PREFIX = "base_model.model."


def _peft_modules(model_type: str = "bert") -> dict[str, str]:
    """LoRA target -> its PyTorch module inside one layer of `model_type` (DistilBERT: query -> attention.q_lin)."""
    return {t: m.replace("/", ".") for t, m in families.get(model_type).modules.items()}


PEFT_MODULES = _peft_modules()


def _module_name(layer: int, target: str, model_type: str = "bert") -> str:
    return families.get(model_type).peft_module(layer, target)


def to_peft_config(lora: LoRAConfig, num_layers: int, *, base_model: str, modules_to_save: list[str],
                   bias: str, model_type: str = "bert") -> dict:
    """adapter_config.json for `lora` on a model of `num_layers` layers, as PEFT's LoraConfig writes it.

    Targets are PEFT suffix names with `layers_to_transform` when that selects exactly our
    modules; otherwise (FFN `output` without `attention_output`, whose suffix `output.dense`
    would match both) a regex naming each module. Per-module ranks become exact `rank_pattern` keys.
    """
    lora.validate(num_layers)
    check_peft_targets(model_type, lora.matched())  # ModernBERT's Wqkv slices: one line
    wrapped = [(i, t) for i in range(num_layers) for t in lora.matched() if lora.wraps(i, t)]
    fam, modules = families.get(model_type), _peft_modules(model_type)
    names = sorted({modules[t] for t in lora.matched()})
    others = [m for t, m in modules.items() if t not in lora.matched()]
    if any(o.endswith("." + m) for m in names for o in others):  # BERT's output.dense alone would match attention's
        targets, layers = "|".join(re.escape(_module_name(i, t, model_type)) for i, t in wrapped), None
    else:
        targets, layers = names, None if lora.layers is None else sorted(lora.layers)
    ranks = {re.escape(_module_name(i, t, model_type).removeprefix(f"{fam.prefix}.{fam.encoder}.")): lora.rank_for(i, t)
             for i, t in wrapped if lora.rank_for(i, t) != lora.rank}
    return {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base_model, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
            "layers_to_transform": layers, "layers_pattern": None, "rank_pattern": ranks, "alpha_pattern": {},
            "use_rslora": lora.rslora, "use_dora": False, "bias": bias, "modules_to_save": modules_to_save,
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True}


def _peft_targets(raw: Mapping, num_layers: int, need, model_type: str = "bert") -> list[tuple[int, str]]:
    """The (layer, target) pairs PEFT would wrap under `raw` (its own matching rules)."""
    targets, layers = raw.get("target_modules"), need("layers_to_transform", (list, int, type(None)))
    layers = [layers] if isinstance(layers, int) else layers
    found = []
    for i in range(num_layers):
        for t in TARGETS:
            key = _module_name(i, t, model_type)
            if isinstance(targets, str):
                hit = re.fullmatch(targets, key) is not None
            else:
                hit = any(key == m or key.endswith("." + m) for m in targets)
                hit = hit and (layers is None or i in layers)
            if hit:
                found.append((i, t))
    return found


def from_peft_config(raw: Mapping, num_layers: int, *, source: str = "adapter_config.json",
                     model_type: str = "bert") -> LoRAConfig:
    """Our LoRAConfig for a PEFT LoRA adapter_config.json on a `model_type` encoder of `num_layers` layers.

    Refuses (one line naming the field) what our LoRA cannot express: other PEFT types, DoRA,
    alpha_pattern, target modules BERT-for-classification has no LoRA slot for.
    """

    def need(key, types):
        value = raw.get(key)
        if not isinstance(value, types):
            raise ConfigError(f"{source}: {key}={value!r} is not supported by spafit_jax's LoRA")
        return value

    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{source}: peft_type={raw.get('peft_type')!r} is not supported; spafit_jax imports LORA adapters")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False)):
        if raw.get(key, ok) not in (ok, None):
            raise ConfigError(f"{source}: {key}={raw[key]!r} is not supported; spafit_jax imports plain LoRA")
    for key in ("alpha_pattern", "layer_replication", "target_parameters", "trainable_token_indices"):
        if raw.get(key):
            raise ConfigError(f"{source}: {key}={raw[key]!r} is not supported; spafit_jax imports plain LoRA")
    targets = need("target_modules", (list, str))
    found = _peft_targets(raw, num_layers, need, model_type)
    modules = ", ".join(sorted(_peft_modules(model_type).values()))
    if not found:
        raise ConfigError(f"{source}: target_modules={targets!r} matches no module spafit_jax can adapt; "
                          f"those are {modules} in {families.get(model_type).layers.replace('/', '.')}.<i>")
    if not isinstance(targets, str):
        unknown = [m for m in targets if not any(_module_name(i, t, model_type).endswith("." + m) for i, t in found)]
        if unknown:
            raise ConfigError(f"{source}: target_modules {unknown} name modules spafit_jax has no LoRA for; "
                              f"the modules are {modules}")
    names = tuple(t for t in TARGETS if any(t == f for _, f in found))
    layers = tuple(sorted({i for i, _ in found}))
    if set(found) != {(i, t) for i in layers for t in names}:
        raise ConfigError(f"{source}: target_modules={targets!r} adapts different modules in different layers; "
                          "spafit_jax's LoRA needs the same targets in every adapted layer")
    r = need("r", int)
    ranks = need("rank_pattern", (dict, type(None))) or {}
    pattern = {}
    for i, t in found:
        key = next((k for k in ranks if re.match(rf"(.*\.)?({k})$", _module_name(i, t, model_type))), None)
        if key is not None and ranks[key] != r:
            pattern[f"^layer/{i}/{t}$"] = int(ranks[key])
    return LoRAConfig(rank=r, alpha=float(need("lora_alpha", (int, float))), dropout=float(raw.get("lora_dropout") or 0.0),
                      targets=names, layers=None if len(layers) == num_layers else layers,
                      rank_pattern=pattern, rslora=bool(raw.get("use_rslora", False)))


def read_peft(folder: str | os.PathLike, num_layers: int,
              model_type: str = "bert") -> tuple[LoRAConfig, dict[str, np.ndarray]]:
    """The LoRAConfig and the tensors (our flat paths) of a PEFT LoRA adapter folder on a `model_type` base."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / PEFT_CONFIG).is_file():
        raise LoadError(f"{folder} has no {PEFT_CONFIG}; pass the folder PeftModel.save_pretrained wrote")
    source = str(folder / PEFT_CONFIG)
    raw = check_peft_config(read_json(folder / PEFT_CONFIG), source)
    lora = from_peft_config(raw, num_layers, source=source, model_type=model_type)
    path = folder / PEFT_WEIGHTS
    if not path.is_file():
        raise LoadError(f"{folder} has no {PEFT_WEIGHTS}; re-save the adapter with safetensors")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{path} is truncated or corrupt ({e}); re-save the adapter") from None
    return lora, from_peft_state(state, model_type)


def is_finite_number(v: Any) -> bool:
    """A JSON number (int or float, not a bool) that is finite: what config.json and adapter_config.json checks ask."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _is_regex(v: Any) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError, RecursionError):
        return False
    return True


PEFT_FIELDS = {  # adapter_config.json field -> (check, what it must be); absent fields take PEFT's defaults
    "peft_type": (lambda v: isinstance(v, str), "a string (LORA)"),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: is_finite_number(v) and v > 0, "a number > 0"),
    "lora_dropout": (lambda v: v is None or is_finite_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false (JSON booleans, not strings)"),
    "target_modules": (lambda v: isinstance(v, str) and v and _is_regex(v) or isinstance(v, list) and v
                       and all(isinstance(m, str) and m for m in v), "a list of module names or one valid regex"),
    "layers_to_transform": (lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0
                            or isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                           for i in v), "null, a layer index or a list of them"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict) and all(
        isinstance(k, str) and _is_regex(k) and isinstance(r, int) and not isinstance(r, bool) and r >= 1
        for k, r in v.items()), "an object of valid regex -> integer rank >= 1"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict), "an object"),
    "modules_to_save": (lambda v: v is None or isinstance(v, list) and all(isinstance(m, str) for m in v),
                        "null or a list of module names"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "none, all or lora_only"),
}


def check_peft_config(raw: Any, source: str) -> dict:
    """`raw` (a parsed adapter_config.json) when every field PEFT_FIELDS knows has its type (regexes
    compile, use_rslora a boolean, ...); else a one-line ConfigError naming `source` and the field."""
    fix = "fix the field or re-save the adapter with PeftModel.save_pretrained"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} holds a JSON {type(raw).__name__}, not an object of LoRA settings; re-save the "
                          "adapter with PeftModel.save_pretrained")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise ConfigError(f"{source}: field {key!r} is missing; {fix}", key)
    for key, (ok, what) in PEFT_FIELDS.items():
        if key in raw and not ok(raw[key]):
            raise ConfigError(f"{source}: {key}={json.dumps(raw[key])[:80]} must be {what}; {fix}", key)
    return raw


def missing_adapters(fresh: Mapping[str, Any], adapted: Mapping[str, Any]) -> list[str]:
    """The LoRA A/B leaves of a model built from an adapter's config (`fresh`) that its tensors lack."""
    return sorted(p for p in fresh if p.endswith(("/lora_a", "/lora_b")) and p not in adapted)


def peft_state(params: Mapping, keep) -> dict[str, np.ndarray]:
    """adapter_model.safetensors tensors of a LoRA tree as PEFT names them: every adapter's A and
    B, and the leaves whose '/'-joined path `keep(path)` accepts (trained biases, head, pooler)."""
    flat = {"/".join(map(str, k)): v for k, v in flatten_dict(dict(params)).items()}
    wrapped = {p.rsplit("/", 1)[0].replace("/", ".") for p in flat if p.endswith("/lora_a")}
    out = {}
    for path, value in flat.items():
        module, leaf = path.rsplit("/", 1)
        if leaf in ("lora_a", "lora_b"):
            name = f"{module.replace('/', '.')}.lora_{leaf[-1].upper()}.weight"
            out[PEFT_PREFIX + families.torch_module_name(name)] = np.ascontiguousarray(np.asarray(value, np.float32).T)
    kept = {tuple(p.split("/")): np.asarray(v, np.float32) for p, v in flat.items()
            if not p.endswith(("lora_a", "lora_b")) and keep(p)}
    for name, value in to_torch_names(unflatten_dict(kept)).items():
        module, leaf = name.rsplit(".", 1)
        ours = families.flax_module_path(module + ".")[:-1]  # ModernBERT's model.layers.<i> is our model.encoder.layer.<i>
        out[PEFT_PREFIX + (f"{module}.base_layer.{leaf}" if ours in wrapped else name)] = value
    return out


def from_peft_state(state: Mapping[str, np.ndarray], model_type: str | None = None) -> dict[str, np.ndarray]:
    """Inverse of `peft_state` for anything PEFT saves: {our flat path: array}; PEFT's wrappers
    (`base_layer`, `modules_to_save.<name>`) are looked through, `original_module` copies dropped."""
    adapters, others = {}, {}
    for name, value in state.items():
        name = name.removeprefix(PEFT_PREFIX)
        if ".original_module." in name:
            continue
        name = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", name.replace(".base_layer.", "."))
        m = re.fullmatch(r"(.*)\.lora_([AB])(\.[^.]+)?\.weight", name)
        if m:
            module = families.flax_module_path(m.group(1) + ".")[:-1]  # ModernBERT: model.encoder.layer.<i>
            adapters[f"{module.replace('.', '/')}/lora_{m.group(2).lower()}"] = np.asarray(value, np.float32).T
        else:
            others[name] = np.asarray(value, np.float32)
    return {**families.from_torch_names(others, model_type), **adapters}


def check_peft_targets(model_type: str, targets) -> None:
    """Refuses (one line) LoRA targets a PEFT adapter cannot carry on `model_type`: ModernBERT's
    query / key / value adapt slices of the fused attn.Wqkv, and PEFT adapts whole modules."""
    sliced = [t for t in targets if model_type == "modernbert" and t in families.MODERNBERT_SLICES]
    if sliced:
            raise ConfigError(f"LoRA targets {sliced} adapt slices of ModernBERT's fused attn.Wqkv, which a PEFT adapter "
                          "(whole modules) cannot carry; export with --format hf (merged), or train with "
                          "method.lora_targets among attention_output, intermediate, output")


def peft_norms(plan, model_type: str = "bert") -> dict[str, str]:
    """The norm modules whose scales (or biases) `plan` trains, outside the task heads: {our '/'-joined
    module path: its PyTorch module name from the model's root}, the `modules_to_save` PEFT copies whole
    (its matching is by suffix, so a name from the root matches that one module only)."""
    heads = families.get(model_type).heads
    leaves = {k[:-1]: k for k, label in flatten_dict(plan.labels).items() if label == LAYERNORM and k[0] not in heads}
    return {"/".join(m): next(iter(to_torch_names(unflatten_dict({k: np.zeros(1)})))).rsplit(".", 1)[0]
            for m, k in leaves.items()}


def peft_parts(plan, model_type: str = "bert") -> tuple[str, list[str]]:
    """PEFT's `bias` and `modules_to_save` for a plan on a `model_type` model: the task heads, the
    pooler and the trained norm modules (`peft_norms`) as whole copies; a plan PEFT cannot express
    (no LoRA, whole weight matrices, ModernBERT's Wqkv slices) is a ConfigError."""
    counts = plan.counts
    fix = "export with --format hf (a merged model) instead"
    if plan.lora is None or LORA not in counts:
        raise ConfigError(f"method {plan.method.name} trains no LoRA adapters, which a PEFT LoRA adapter needs; {fix}")
    if WEIGHT in counts:
        raise ConfigError(f"method {plan.method.name} trains whole weight matrices, which a PEFT LoRA adapter cannot "
                          f"carry; {fix}")
    check_peft_targets(model_type, plan.lora.matched())
    heads = families.get(model_type).heads
    modules = (list(heads) if HEAD in counts else []) + (["pooler"] if POOLER in counts else [])
    return ("all" if BIAS in counts else "none"), modules + sorted(peft_norms(plan, model_type).values())
