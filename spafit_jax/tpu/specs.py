"""What `aot` needs to know that is not in the program: TPU chips and topologies, named architectures,
the task's head size, and the model FLOPs we count ourselves.

Chip figures: the HBM that XLA's TPU compiler lets a program use, and Google's published peak dense
bf16 FLOP/s and HBM bandwidth per chip (Cloud TPU docs, "System architecture"). XLA refuses to
compile a program that needs more HBM than that; we report such a program as not fitting.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
from typing import Any

from spafit_jax.errors import ConfigError, SpafitError
from spafit_jax.methods import FROZEN

GIB = 2**30


class AotError(SpafitError):
    """Ahead-of-time compilation cannot run here (no libtpu, a libtpu that does not match jax, a bad topology)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s; `megacore`: two TensorCores seen as one device."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    megacore: bool
    twod: bool  # a 2-D torus (v5e, v6e) rather than 3-D (v4, v5p)


# HBM: what XLA's TPU compiler lets a program use (its "available HBM" of libtpu 0.0.42; the chips
# have 32, 16, 95 and 32 GiB); FLOP/s and bandwidth: Google's published per-chip figures.
CHIPS = {
    "v4": Chip("v4", int(30.75 * GIB), 275e12, 1200e9, True, False),
    "v5e": Chip("v5e", int(15.75 * GIB), 197e12, 819e9, False, True),
    "v5p": Chip("v5p", int(95.74 * GIB), 459e12, 2765e9, True, False),
    "v6e": Chip("v6e", int(31.25 * GIB), 918e12, 1640e9, False, True),
}
# Peak dense bf16 FLOP/s of one JAX device by its device_kind (substring, lower case, first match): the
# chips above, and the generations aot does not compile for (v2/v3 expose one device per core, later
# generations one per chip). `benchmarks.common` measures against it.
DEVICE_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v2", 22.5e12), ("tpu v3", 61.5e12), ("tpu v4 lite", 137.5e12), ("tpu v4", CHIPS["v4"].peak_flops),
    ("tpu v5 lite", CHIPS["v5e"].peak_flops), ("tpu v5e", CHIPS["v5e"].peak_flops),
    ("tpu v5p", CHIPS["v5p"].peak_flops), ("tpu v5", CHIPS["v5p"].peak_flops),
    ("tpu v6 lite", CHIPS["v6e"].peak_flops), ("tpu v6e", CHIPS["v6e"].peak_flops), ("tpu7x", 2307e12),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def out_of_memory(message: str) -> int | None:
    """The bytes a program that XLA refused for want of HBM says it needs beyond its arguments (its
    "RESOURCE_EXHAUSTED: ... required for HLO temporaries (1.06T) exceeds available HBM (15.75G)"), else None."""
    m = re.search(r"RESOURCE_EXHAUSTED.*?required for [^(]*\(([\d.]+)([KMGTP]?)\) exceeds available HBM", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None
_FAMILY = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v5p": "v5p", "v6e": "v6e"}
# chips -> the slice's shape, as `gcloud compute tpus accelerator-types list` describes them
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
MAX_CHIPS = {"v4": 4096, "v5e": 256, "v5p": 8960, "v6e": 256}  # the largest slice of each (Cloud TPU docs)
TOPOLOGY_HELP = ("a topology CHIP:SHAPE (v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4; v4:4x4x4 is 64 chips on 16 hosts) or "
                 "an accelerator type (v4-8 and v5p-8: 8 TensorCores = 4 chips; v5litepod-8 and v6e-8: 8 chips). "
                 "v5e/v6e slices of up to 8 chips are one host; larger slices have 4 chips per host")


@dataclasses.dataclass
class Topology:
    """A TPU slice that need not be attached: its compile-only devices, hosts and chip."""

    name: str
    chip: Chip
    devices: list
    hosts: int


def parse_topology(text: str) -> tuple[Chip, str]:
    """(chip, libtpu topology name) of `v5e:2x4` or an accelerator type such as `v5litepod-8`; ConfigError if unknown."""
    t = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", t)
    bad = f"--topology {text!r} is not a TPU topology; use {TOPOLOGY_HELP}"
    if m:
        chip = CHIPS.get(_FAMILY.get(m.group(1), ""))
        dims = [int(d) for d in m.group(2).split("x")]
        if chip is None or len(dims) != (2 if chip.twod else 3):
            raise ConfigError(bad)
        if min(dims) < 1 or math.prod(dims) > MAX_CHIPS[chip.name]:
            raise ConfigError(f"--topology {text!r}: {'x'.join(map(str, dims))} is {math.prod(dims)} chips, but a "
                              f"{chip.name} slice has 1 to {MAX_CHIPS[chip.name]} chips, at least 1 along each side; "
                              f"give a real slice, e.g. {chip.name}:{(_SHAPES_2D if chip.twod else _SHAPES_3D)[8]}")
        return chip, f"{chip.name}:{'x'.join(map(str, dims))}"
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", t)
    chip = CHIPS.get(_FAMILY.get(m.group(1), "")) if m else None
    if chip is None:
        raise ConfigError(bad)
    chips = int(m.group(2)) // (2 if chip.megacore else 1)
    shape = (_SHAPES_2D if chip.twod else _SHAPES_3D).get(chips)
    if shape is None:
        raise ConfigError(f"--topology {text!r}: no known shape for {chips} {chip.name} chips; give the shape, "
                          f"e.g. {chip.name}:{next(iter((_SHAPES_2D if chip.twod else _SHAPES_3D).values()))}")
    return chip, f"{chip.name}:{shape}"


def topology(text: str) -> Topology:
    """The compile-only devices of a TPU topology (needs libtpu; `prepare` first)."""
    from jax.experimental import topologies

    chip, name = parse_topology(text)
    dims = [int(d) for d in name.split(":")[1].split("x")]
    kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if chip.megacore else {}
    if chip.twod:  # up to 8 chips on one host, else 2x2 chips per host
        single = dims[0] * dims[1] <= 8
        kwargs["chips_per_host_bounds"] = (dims[0], dims[1], 1) if single else (2, 2, 1)
    chips = math.prod(dims)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"v5litepod-{chips}" if chip.name == "v5e" else
                          f"{chip.name}-{chips * (2 if chip.megacore else 1)}")  # as on a TPU VM; quiets libtpu
    try:
        devices = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
    except Exception as e:  # noqa: BLE001 (libtpu raises runtime errors of its own)
        raise AotError(f"libtpu cannot describe topology {name}: {str(e).splitlines()[0][:200]}") from None
    return Topology(name, chip, list(devices), len({d.process_index for d in devices}))


def install_hint() -> str:
    """How to install the libtpu that matches the installed jax."""
    return f'pip install "jax[tpu]=={importlib.metadata.version("jax")}" (libtpu {libtpu_pin() or "?"})'


def libtpu_pin() -> str | None:
    """The libtpu version spec the installed jax's `tpu` extra asks for (e.g. `==0.0.42.*`)."""
    for req in importlib.metadata.requires("jax") or []:
        m = re.match(r"libtpu\s*([=<>!~][^;]*);.*extra\s*==\s*['\"]tpu['\"]", req)
        if m:
            return m.group(1).strip()
    return None


def libtpu_version() -> str | None:
    """The installed libtpu's version, None when it cannot be imported."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:  # importable without its metadata
        return "unknown"


def prepare(compile_cache: bool = True) -> None:
    """Checks that a libtpu matching jax is importable (else one AotError line) and keeps jax on the CPU
    (the topology is compiled for, never attached), before jax picks its backends. `compile_cache=False`
    turns JAX's persistent compilation cache off for the process (the command line: a TPU program compiled
    here cannot be loaded back without a TPU, so caching it only costs disk)."""
    have = libtpu_version()
    if have is None:
        raise AotError(f"ahead-of-time compilation for TPU needs libtpu, which is not installed: {install_hint()}")
    pin = libtpu_pin()
    if pin and pin.startswith("==") and not re.fullmatch(re.escape(pin[2:]).replace(r"\*", ".*"), have):
        raise AotError(f"libtpu {have} does not match jax {importlib.metadata.version('jax')}, which needs libtpu{pin}; "
                       f"{install_hint()}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: no metadata server to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: no need for libtpu's lock file
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # what a TPU VM sets; else libtpu logs errors
    os.environ.setdefault("TPU_WORKER_ID", "0")
    import jax

    jax.config.update("jax_platforms", "cpu")
    if not compile_cache:
        jax.config.update("jax_enable_compilation_cache", False)


# Named architectures (Hugging Face config.json fields), so that the common models need no download.
_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
ARCHITECTURES = {
    "bert-base-uncased": dict(_BASE, vocab_size=30522),
    "bert-base-cased": dict(_BASE, vocab_size=28996),
    "bert-large-uncased": dict(_LARGE, vocab_size=30522),
    "bert-large-cased": dict(_LARGE, vocab_size=28996),
    "google-bert/bert-base-uncased": dict(_BASE, vocab_size=30522),
    "google-bert/bert-large-cased": dict(_LARGE, vocab_size=28996),
}


def model_config(name: str):
    """The BertConfig of a named architecture, else of the config.json of a local folder / alias / cached hub id."""
    from spafit_jax.models import hf
    from spafit_jax.models.bert import BertConfig

    if name in ARCHITECTURES:
        return BertConfig.from_dict(dict(ARCHITECTURES[name], model_type="bert"))
    path = os.path.join(os.path.expanduser(name), "config.json")
    if os.path.isfile(path) or name in hf.ALIASES:
        return hf.read_config(hf.resolve(name))
    try:
        from huggingface_hub import hf_hub_download

        raw = json.loads(open(hf_hub_download(name, "config.json")).read())
    except Exception:  # noqa: BLE001 (network and cache errors come in many types)
        raise ConfigError(f"model.name={name!r}: no config.json here or in the Hugging Face cache; name an architecture "
                          f"({', '.join(ARCHITECTURES)}), a folder with config.json, or fetch it with `hf download "
                          f"{name} config.json`", "name") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model.name={name!r}: its config.json holds a JSON {type(raw).__name__}, not an object of "
                          f"model settings; fetch it again with `hf download {name} config.json`", "name")
    return hf.config_from_raw(raw, f"{name} config.json")


def num_labels(data_cfg) -> int:
    """The head size the trainer would build: the registered task's, else data.num_labels (2 when it is
    inferred from data, which aot does not read; 1 for regression)."""
    from spafit_jax.data import tasks

    if data_cfg.is_regression:
        return 1
    if data_cfg.task in tasks.TASKS:
        return tasks.TASKS[data_cfg.task].num_labels
    return data_cfg.num_labels or 2


def _layer(path: tuple[str, ...]) -> int | None:
    return int(path[path.index("layer") + 1]) if "layer" in path else None


def model_flops(params, plan, config, batch: int, length: int, *, train: bool, start_layer: int = 0) -> float:
    """FLOPs of one step counted from the model, matmuls only (what MFU counts).

    Forward: 2 x rows x in x out per matrix (kernels, LoRA A and B; rows = B x T, or B for the pooler and
    the head) plus attention's 4 x B x T^2 x D per layer. A train step adds, as the step differentiates the
    trainable half only, the activation gradients of every layer from the lowest one with a trainable
    leaf up (x1 its forward; x2 for attention's two activation products) and the weight gradients of the trainable matrices (x1 each). Layers below
    `start_layer` do not run (the frozen-stratum cache). `params`: shapes; `plan`: their labelled `Plan`, whose
    `frozen_depth` is the lowest layer the backward pass reaches.
    """
    from flax.traverse_util import flatten_dict

    flat, lab = flatten_dict(params), flatten_dict(plan.labels)
    lowest = plan.frozen_depth  # 0 when an embedding trains: every layer then has activation gradients
    forward = backward = 0.0
    for path, x in flat.items():
        layer = _layer(path)
        if path[-1] not in ("kernel", "lora_a", "lora_b") or len(x.shape) != 2 or (layer or 0) < start_layer:
            continue
        rows = batch * length if layer is not None or any("embeddings" in k for k in path) else batch
        f = 2.0 * rows * int(x.shape[0]) * int(x.shape[1])
        forward += f
        if train:
            backward += f * ((layer is None or layer >= lowest) + (lab[path] != FROZEN))
    attention = 4.0 * batch * length * length * config.hidden_size
    for layer in range(start_layer, config.num_hidden_layers):
        forward += attention
        backward += 2 * attention * (train and layer >= lowest)  # scores and context: both inputs' gradients
    return forward + backward
