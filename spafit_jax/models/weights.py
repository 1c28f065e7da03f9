"""Weight files: the tensors of `model.safetensors` (also sharded), `flax_model.msgpack` or
`pytorch_model.bin` as flat {'/'-joined Flax path: array} in our layout (`read_weights`), and back
to PyTorch names (`to_torch_names`); the name maps themselves are each family's (`families`).
A pickle that names code to run is refused, never executed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from spafit_jax.models import families
from spafit_jax.errors import LoadError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
FLAX, TORCH = "flax_model.msgpack", "pytorch_model.bin"


def read_weights(folder: Path, model_type: str | None = None) -> dict[str, np.ndarray]:
    """Flat {'/'-joined Flax path: array} from the folder's weight file, names mapped to our layout
    (of `model_type`'s family; None: the family whose prefix the names carry, else BERT)."""
    if (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS).is_file():
        state, flax_format = _read_safetensors(folder)
        if flax_format:  # written by a Flax model: '.'-joined Flax paths, kernels already (in, out)
            return families.with_prefix({k.replace(".", "/"): v for k, v in state.items()}, model_type)
        return families.from_torch_names(state, model_type)
    if (folder / FLAX).is_file():
        return _read_flax(folder / FLAX, model_type)
    if (folder / TORCH).is_file():
        return families.from_torch_names(_read_torch_bin(folder / TORCH), model_type)
    raise LoadError(f"{folder} has no weights; expected {SAFETENSORS}, {FLAX} or {TORCH}")


def _read_safetensors(folder: Path) -> tuple[dict[str, np.ndarray], bool]:
    """The tensors of model.safetensors (or its shards), and whether a Flax model wrote them."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if (folder / SAFETENSORS_INDEX).is_file():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        files = [SAFETENSORS]
    out, flax_format = {}, False
    for f in files:
        try:
            out.update(load_file(str(folder / f)))
            with safe_open(str(folder / f), "np") as handle:
                flax_format |= (handle.metadata() or {}).get("format") == "flax"
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
            raise LoadError(f"{folder / f} is truncated or corrupt ({e}); re-download or re-save the model") from None
    return out, flax_format


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    if importlib.util.find_spec("torch") is None:
        raise LoadError(f"{path} needs PyTorch to read; pip install torch, or save the model as safetensors")
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            # a pickle naming code to run (a class, a function): executing it is what a malicious file wants
            raise LoadError(f"{path} is a pickle that names code to run (torch.load(weights_only=True) refused "
                            f"{_culprit(e)}); it is not loaded, for "
                            f"safety: convert the model to {SAFETENSORS} (e.g. save_pretrained(..., "
                            "safe_serialization=True) where you trust it) and load that") from None
        raise LoadError(f"{path} is truncated or corrupt ({type(e).__name__}); re-download or re-save the model") from None
    if not isinstance(state, dict) or not all(hasattr(v, "numpy") for v in state.values()):
        raise LoadError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; save the model with "
                        f"save_pretrained (as {SAFETENSORS})")
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def _culprit(e: BaseException) -> str:
    """What torch's weights-only unpickler refused (its 'Unsupported global: GLOBAL x' line), else 'it'."""
    m = re.search(r"Unsupported (?:global|operand)[^\n.]*", str(e))
    return m.group(0).strip() if m else "it"


def _read_flax(path: Path, model_type: str | None = None) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore

    try:
        tree = msgpack_restore(path.read_bytes())
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{path} is truncated or corrupt ({type(e).__name__}); re-download or re-save the model") from None
    return families.with_prefix({"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}, model_type)


def to_torch_names(params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of the name map `read_weights` applies: a (merged) Flax tree to PyTorch BERT names,
    kernels transposed to (out, in); the keys of transformers' BertForSequenceClassification."""
    out = {}
    for path, value in flatten_dict(dict(params)).items():
        *parents, leaf = map(str, path)
        value = np.asarray(value)
        if leaf in ("lora_a", "lora_b"):
            raise LoadError(f"{'/'.join(path)}: merge the LoRA adapters first (lora.merge) to save PyTorch names")
        if leaf == "kernel":
            leaf, value = "weight", value.T
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join(parents + [leaf])] = np.ascontiguousarray(value)
    out = families.to_torch_layout(out)  # ModernBERT: model.layers.<i>, fused Wqkv
    return out
