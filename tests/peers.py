"""The checks against PEFT that the family tests share (torch and peft imported when called): LoRA gradients,
and a trained run's hf and peft exports.

Our adapters are copied into PEFT's LoRA layers of the same PyTorch model; one cross-entropy backward pass
on each side must give the same logits, loss and gradients of every A and B. Our factors are laid out
as A: in x r, B: r x out; PEFT's weights are their transposes.
"""

import jax
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from spafit_jax.lora import adapters

ATOL, GRAD_ATOL = 1e-5, 1e-4


def our_lora_grads(model, params, labels, *inputs):
    """Our logits, loss and {adapter path: (grad of A, grad of B)}, differentiating only the adapters of
    `params` (`lora.adapters`) through `model.apply(..., *inputs)`."""

    def loss(leaves):
        tree = flatten_dict(params, sep="/")
        tree.update({f"{p}/{k}": v for p, node in leaves.items() for k, v in node.items()})
        logits = model.apply({"params": unflatten_dict(tree, sep="/")}, *inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(adapters(params))
    return np.asarray(logits), float(value), {p: (g["lora_a"], g["lora_b"]) for p, g in grads.items()}


def peft_lora_grads(ref, factors, torch_inputs, labels):
    """PEFT's logits, loss and {key: (grad of A, grad of B)} in our layout, after copying `factors`
    ({key: (PEFT module name, adapter name, A, B)}, ours) into the LoRA layers of `ref`, a PEFT model."""
    import torch

    weights = {}
    with torch.no_grad():
        for key, (module, adapter, a, b) in factors.items():
            layer = ref.get_submodule(module)
            weights[key] = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            for weight, ours in zip(weights[key], (a, b)):
                weight.copy_(torch.tensor(np.asarray(ours).T))
    logits = ref(**torch_inputs).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
    loss.backward()
    return (logits.detach().numpy(), loss.item(),
            {key: (a.grad.numpy().T, b.grad.numpy().T) for key, (a, b) in weights.items()})


def assert_same(ours, theirs) -> float:
    """Asserts that two (logits, loss, {key: (grad of A, grad of B)}) agree, every key on both sides;
    returns the largest gradient difference."""
    np.testing.assert_allclose(ours[0], theirs[0], atol=ATOL)
    np.testing.assert_allclose(ours[1], theirs[1], atol=ATOL)
    assert set(ours[2]) == set(theirs[2])
    worst = 0.0
    for key, pair in theirs[2].items():
        for mine, other in zip(ours[2][key], pair):
            np.testing.assert_allclose(mine, other, atol=GRAD_ATOL, err_msg=str(key))
            worst = max(worst, float(np.abs(np.asarray(mine) - other).max()))
    return worst


def lora_matches_peft(ref, model, params, inputs, torch_inputs, labels, prefix="base_model.model."):
    """Asserts that our LoRA model and PEFT's `ref` agree (`assert_same`) where our adapter at path `p`
    is PEFT's module `prefix` + `p` with dots (adapter "default"). Returns our logits and the largest
    gradient difference."""
    factors = {p: (prefix + p.replace("/", "."), "default", n["lora_a"], n["lora_b"])
               for p, n in adapters(params).items()}
    ours = our_lora_grads(model, params, labels, *inputs)
    return ours[0], assert_same(ours, peft_lora_grads(ref, factors, torch_inputs, labels))


def exports_match_ours(workdir, base_dir):
    """The run in `workdir` (trained on `base_dir`) exported to workdir/hf and workdir/peft: transformers on the hf
    export and PEFT on the base give our predicted probabilities to 1e-5. Returns the peft export's folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from spafit_jax import load_run
    from spafit_jax.after_training import exporting

    run = load_run(workdir, checkpoint="last")
    texts = ["the markets rallied today", "a film that nobody saw coming", "rain"]
    ours = run.predict(texts)
    hf_dir, peft_dir = exporting.export(run, workdir / "hf", "hf"), exporting.export(run, workdir / "peft", "peft")
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    enc = tok(texts, padding=True, return_tensors="pt")
    for model in (AutoModelForSequenceClassification.from_pretrained(str(hf_dir)),
                  PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
                      str(base_dir), num_labels=ours.shape[1]), str(peft_dir))):
        with torch.no_grad():
            theirs = torch.softmax(model.eval()(**enc).logits, -1).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    return peft_dir
