"""The encoder families spafit_jax loads, and what differs between them: the one owner of these facts.

A `Family` says, for one Hugging Face `model_type`, where the base model and its layers sit in the
parameter tree (`roberta/encoder/layer/3`, `distilbert/transformer/layer/3`), which classification
head it carries, how its positions and token types work, how its config.json names its sizes
(DistilBERT's `dim`, `n_layers`, ...), which PyTorch modules are pre-training heads to drop, and
where each LoRA target sits inside a layer (`query` is `attention/self/query` in BERT,
`attention/q_lin` in DistilBERT; PEFT names the same modules with '.'). `bert.py` builds the model
from these facts and `hf.py` maps weight names with them. Imports no jax or flax.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from spafit_jax.errors import LoadError

_BERT_MODULES = {"query": "attention/self/query", "key": "attention/self/key", "value": "attention/self/value",
                 "attention_output": "attention/output/dense", "intermediate": "intermediate/dense",
                 "output": "output/dense"}
_DISTILBERT_MODULES = {"query": "attention/q_lin", "key": "attention/k_lin", "value": "attention/v_lin",
                       "attention_output": "attention/out_lin", "intermediate": "ffn/lin1", "output": "ffn/lin2"}
# DeBERTa-v2/v3: our names for transformers' query_proj / key_proj / value_proj; the rest as in BERT
_DEBERTA_MODULES = dict(_BERT_MODULES, query="attention/self/query_proj", key="attention/self/key_proj",
                        value="attention/self/value_proj")


@dataclasses.dataclass(frozen=True)
class Family:
    """The facts of one encoder family (see the module docstring)."""

    model_type: str
    prefix: str  # the base model's name in the tree: bert, roberta, electra, distilbert
    architecture: str  # transformers' sequence-classification class
    head: str  # pooler (BERT: pooler -> classifier), tanh / gelu (classifier/dense -> act -> classifier/out_proj),
    #            pre_classifier (DistilBERT: pre_classifier -> ReLU -> classifier)
    encoder: str = "encoder"  # the module holding layer/<i>
    layer: str = "bert"  # layer layout: bert (attention/self/query, ...) or distilbert (attention/q_lin, ...)
    position_offset: bool = False  # RoBERTa: real tokens at pad_token_id + 1, +2, ...; padding at pad_token_id
    token_types: bool = True
    heads: tuple[str, ...] = ("classifier",)  # top-level task-head modules beside the base model
    dropped: tuple[str, ...] = ()  # top-level pre-training modules a sequence classifier drops
    config_keys: tuple[tuple[str, str], ...] = ()  # (config.json name, our BertConfig name)
    fixed: tuple[tuple[str, Any], ...] = ()  # BertConfig values the family does not read from config.json
    module: str = "bert"  # the spafit_jax module that builds the family (others export Config, ForSequenceClassification)

    @property
    def modules(self) -> dict[str, str]:
        """LoRA target -> its module path inside one layer ('/'-joined; PEFT joins the same names with '.')."""
        return dict({"distilbert": _DISTILBERT_MODULES, "deberta": _DEBERTA_MODULES}.get(self.layer, _BERT_MODULES))

    @property
    def layers(self) -> str:
        """The path prefix of the layers: `bert/encoder/layer`, `distilbert/transformer/layer`."""
        return f"{self.prefix}/{self.encoder}/layer"

    @property
    def logits_kernel(self) -> str:
        """The path of the kernel that outputs the logits."""
        return "classifier/out_proj/kernel" if self.head in ("tanh", "gelu") else "classifier/kernel"

    def peft_module(self, layer: int, target: str) -> str:
        """PyTorch / PEFT module name of LoRA target `target` in layer `layer`."""
        return f"{self.layers}/{layer}/{self.modules[target]}".replace("/", ".")


_ROBERTA = dict(prefix="roberta", head="tanh", position_offset=True, dropped=("lm_head",))
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("bert", "bert", "BertForSequenceClassification", "pooler", dropped=("cls",)),
    Family("roberta", architecture="RobertaForSequenceClassification", **_ROBERTA),
    Family("xlm-roberta", architecture="XLMRobertaForSequenceClassification", **_ROBERTA),
    Family("electra", "electra", "ElectraForSequenceClassification", "gelu",
           dropped=("discriminator_predictions", "generator_predictions", "generator_lm_head")),
    Family("distilbert", "distilbert", "DistilBertForSequenceClassification", "pre_classifier",
           encoder="transformer", layer="distilbert", token_types=False, heads=("pre_classifier", "classifier"),
           dropped=("vocab_transform", "vocab_layer_norm", "vocab_projector"),
           config_keys=(("dim", "hidden_size"), ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
                        ("hidden_dim", "intermediate_size"), ("activation", "hidden_act"),
                        ("dropout", "hidden_dropout_prob"), ("attention_dropout", "attention_probs_dropout_prob"),
                        ("seq_classif_dropout", "classifier_dropout")),
           fixed=(("layer_norm_eps", 1e-12), ("type_vocab_size", 1))),
    # DeBERTa-v2/v3 (deberta.py): the context pooler is a top-level module beside the classifier
    Family("deberta-v2", "deberta", "DebertaV2ForSequenceClassification", "pooler", layer="deberta",
           heads=("pooler", "classifier"), dropped=("lm_predictions", "mask_predictions", "cls"),
           config_keys=(("cls_dropout", "classifier_dropout"),), module="deberta"),
)}


# ----------------------------------------------------------------------------------- ModernBERT
#: LoRA target -> its module in our tree (`modernbert.py`): query/key/value are slices of the fused Wqkv.
_MODERNBERT_MODULES = {"query": "attn/Wqkv/query", "key": "attn/Wqkv/key", "value": "attn/Wqkv/value",
                       "attention_output": "attn/Wo", "intermediate": "mlp/Wi", "output": "mlp/Wo"}
#: LoRA targets that are slices of a PyTorch module (PEFT adapts whole modules only).
MODERNBERT_SLICES = ("query", "key", "value")


class _ModernBertFamily(Family):
    """ModernBERT: layers at `model/encoder/layer/<i>` in our tree, `model.layers.<i>` in PyTorch and PEFT."""

    @property
    def modules(self) -> dict[str, str]:
        return dict(_MODERNBERT_MODULES)

    def peft_module(self, layer: int, target: str) -> str:
        return f"model.layers.{layer}.{self.modules[target].replace('/', '.')}"


FAMILIES["modernbert"] = _ModernBertFamily(
    "modernbert", "model", "ModernBertForSequenceClassification", "modernbert", layer="modernbert",
    token_types=False, heads=("head", "classifier"), dropped=("decoder",),
    config_keys=(("hidden_activation", "hidden_act"), ("norm_eps", "layer_norm_eps"),
                 ("mlp_dropout", "hidden_dropout_prob"), ("attention_dropout", "attention_probs_dropout_prob")),
    module="modernbert")

SUPPORTED = ", ".join(FAMILIES)


def get(model_type: str) -> Family:
    """The Family of `model_type`; a LoadError naming the supported types otherwise."""
    if model_type not in FAMILIES:
        raise LoadError(f"model_type {model_type!r} is not supported; spafit_jax loads {SUPPORTED}")
    return FAMILIES[model_type]


# ----------------------------------------------------------------------------------- config.json
def config_fields(raw: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """A config.json dict in our BertConfig names (model_type checked, DistilBERT's names translated)."""
    model_type = raw.get("model_type", "bert")
    if model_type not in FAMILIES:
        raise LoadError(f"{source} describes a {model_type!r} model; spafit_jax loads model_type {SUPPORTED}")
    fam = FAMILIES[model_type]
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise LoadError(f"{source}: position_embedding_type {raw['position_embedding_type']!r} is not supported; "
                        "use 'absolute'")
    out = dict(raw, model_type=model_type)
    for theirs, ours in fam.config_keys:
        if theirs in raw:
            out[ours] = raw[theirs]
    out.update(fam.fixed)
    if model_type == "electra" and out.get("embedding_size") == out.get("hidden_size", 768):
        out["embedding_size"] = None  # no embeddings_project
    return out


def hf_config(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `config_fields`: our BertConfig fields as the family's config.json names them."""
    fam = get(fields.get("model_type", "bert"))
    out = {k: v for k, v in fields.items() if k not in dict(fam.fixed) and v is not None}
    for theirs, ours in fam.config_keys:
        if ours in out:
            out[theirs] = out.pop(ours)
    if fam.model_type == "electra":
        out.setdefault("embedding_size", fields["hidden_size"])
    if fam.model_type != "distilbert":
        out.pop("sinusoidal_pos_embds", None)
    return dict(out, model_type=fam.model_type, architectures=[fam.architecture])


# ----------------------------------------------------------------------------------- weight names
def family_of_names(names: Any, model_type: str | None = None) -> Family:
    """`model_type`'s family, or (None) the one whose prefix starts the names; BERT otherwise."""
    if model_type is not None:
        return get(model_type)
    firsts = {n.replace("/", ".").split(".")[0] for n in names}
    return next((f for f in FAMILIES.values() if f.prefix in firsts), FAMILIES["bert"])


_NORM = re.compile(r"(^LayerNorm$|layer_norm$)")


def _dropped(fam: Family, parts: list[str]) -> bool:
    """A pre-training head, or a pooler the family's classifier does not use (roberta-base ships one)."""
    return parts[0] in fam.dropped or (fam.head != "pooler" and "pooler" in parts[:2])


def from_torch_names(state: Mapping[str, Any], model_type: str | None = None) -> dict[str, np.ndarray]:
    """PyTorch names ('roberta.encoder.layer.0.attention.self.query.weight') to our Flax paths.

    Base-model names without the prefix get it; the family's pre-training heads are dropped;
    Linear weights are transposed to Flax kernels, LayerNorm weights become scales.
    """
    fam = family_of_names(state, model_type)
    if fam.model_type == "modernbert":
        return modernbert_from_torch(state)
    out = {}
    for name, value in state.items():
        parts = name.split(".")
        if _dropped(fam, parts):
            continue
        if parts[0] not in (fam.prefix, *fam.heads):
            parts = [fam.prefix] + parts
        leaf, value = parts[-1], np.asarray(value)
        if _NORM.search(parts[-2]) or leaf in ("gamma", "beta"):
            leaf = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
        elif leaf == "weight" and parts[-2].endswith("_embeddings"):
            leaf = "embedding"
        elif leaf == "weight":
            leaf, value = "kernel", value.T
        out["/".join(parts[:-1] + [leaf])] = value
    return out


def with_prefix(flat: Mapping[str, Any], model_type: str | None = None) -> dict[str, Any]:
    """Flax paths of a base model saved without its prefix (FlaxBertModel) get it; pre-training heads are dropped."""
    fam = family_of_names(flat, model_type)
    kept = {k: v for k, v in flat.items() if not _dropped(fam, k.split("/"))}
    if any(k.startswith(fam.prefix + "/") for k in kept):
        return kept
    return {(k if k.split("/")[0] in fam.heads else f"{fam.prefix}/{k}"): v for k, v in kept.items()}


# ----------------------------------------------------------------------------------- ModernBERT names
_MB_LAYER = re.compile(r"(^|\.)model\.layers\.(\d+)\.")
_MB_OURS = re.compile(r"(^|\.)model\.encoder\.layer\.(\d+)\.")
_QKV = ("query", "key", "value")


def modernbert_from_torch(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """ModernBERT's PyTorch names to our paths (the table in `modernbert.py`): `model.layers.<i>` becomes
    `model/encoder/layer/<i>`, the fused `attn.Wqkv` its query/key/value slices, norm weights scales;
    names of a base model get `model.`, the masked-LM `decoder` is dropped."""
    out = {}
    for name, value in state.items():
        parts, value = name.split("."), np.asarray(value)
        if parts[0] == "decoder":
            continue
        if parts[0] not in ("model", "head", "classifier"):
            parts = ["model"] + parts
        if parts[1:2] == ["layers"]:
            parts[1:3] = ["encoder", "layer", parts[2]]
        module, leaf = parts[:-1], parts[-1]
        if module[-1].endswith("norm"):
            leaf = {"weight": "scale"}.get(leaf, leaf)
        elif module[-1] == "tok_embeddings":
            leaf = "embedding"
        elif leaf == "weight":
            leaf, value = "kernel", value.T
        if module[-1] == "Wqkv":
            for q, part in zip(_QKV, np.split(value, 3, axis=-1)):
                out["/".join(module + [q, leaf])] = part
        else:
            out["/".join(module + [leaf])] = value
    return out


def to_torch_layout(names: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch names of our tree (kernels already transposed) as transformers names ModernBERT's modules:
    `model.encoder.layer.<i>` back to `model.layers.<i>`, the Wqkv slices fused; other families unchanged."""
    if not any(_MB_OURS.search(n) for n in names):
        return dict(names)
    out, fused = {}, {}
    for name, value in names.items():
        name = torch_module_name(name)
        m = re.fullmatch(r"(.*\.Wqkv)\.(query|key|value)\.(weight|bias)", name)
        if m:
            fused.setdefault(f"{m.group(1)}.{m.group(3)}", {})[m.group(2)] = value
        else:
            out[name] = value
    for name, parts in fused.items():
        if set(parts) != set(_QKV):
            raise LoadError(f"{name}: only {sorted(parts)} of its query/key/value slices are given; the fused Wqkv "
                            "needs all three")
        out[name] = np.ascontiguousarray(np.concatenate([parts[q] for q in _QKV], axis=0))
    return out


def torch_module_name(name: str) -> str:
    """`model.encoder.layer.<i>.` (our ModernBERT tree, '.'-joined) as PyTorch's `model.layers.<i>.`."""
    return _MB_OURS.sub(lambda m: f"{m.group(1)}model.layers.{m.group(2)}.", name)


def flax_module_path(name: str) -> str:
    """Inverse of `torch_module_name`, '.'-joined: `model.layers.<i>.` as `model.encoder.layer.<i>.`."""
    return _MB_LAYER.sub(lambda m: f"{m.group(1)}model.encoder.layer.{m.group(2)}.", name)
