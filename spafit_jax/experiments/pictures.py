"""The pictures of the reports, drawn with matplotlib's object API (no pyplot, no global backend state) and
saved as PNG and SVG: `figure` and `save` (shared with `protocol`), and `report`'s pictures of finished
runs (`PICTURES`): the main metric vs trainable parameters with its Pareto front, loss and evaluation
curves, the (N1, N2) heatmap and what each encoder layer trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from spafit_jax.errors import SpafitError
from spafit_jax.training.plan import LAYER_KINDS
from spafit_jax.experiments.tables import Groups, RunRecord, mean_std

#: the colour of each of the plan's layer kinds (`plan.LAYER_KINDS`) in the strata picture.
KINDS = dict(zip(LAYER_KINDS, ("#d9d9d9", "#9ecae1", "#fdd0a2", "#e6550d", "#31a354", "#c6dbef", "#fd8d3c")))


#: the marker of the i-th method (cycled), beside its colour C<i>.
MARKERS = "osD^vP*X<>"


def figure(n: int, title: str, width: float = 4.5, height: float = 3.6):
    """(figure, axes): `n` panels titled `title`, three to a row, each `width` x `height` inches."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no backend switch

    cols = min(n, 3)
    fig = Figure(figsize=(width * cols, height * math.ceil(n / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes


def save(fig, out: Path, name: str) -> list[str]:
    """Writes `fig` as out/name.png and out/name.svg (no date in the SVG); returns the two file names."""
    fig.savefig(out / f"{name}.png", dpi=110)
    fig.savefig(out / f"{name}.svg", metadata={"Date": None})
    return [f"{name}.png", f"{name}.svg"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer (or equal) parameters and a higher score, by parameters."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_params_vs_metric(groups: Groups, out: Path) -> list[str]:
    """Main metric vs trainable parameters (log x) per task, error bars over seeds, the Pareto front dashed."""
    fig, axes = figure(len(groups.tasks), "Main metric vs trainable parameters")
    legend = {}  # method -> handle: one legend for the figure (labels beside the points overlap)
    for ax, task in zip(axes, groups.tasks):
        points = []
        for i, m in enumerate(groups.methods):
            mean, std = groups.score(task, m)
            if mean is None:
                continue
            x = groups.params(task, m)
            points.append((x, 100 * mean))
            legend[m] = ax.errorbar(x, 100 * mean, yerr=None if std is None else 100 * std, fmt=MARKERS[i % len(MARKERS)],
                                    capsize=3, color=f"C{i % 10}", label=m)
        front = pareto_front(points)
        legend["Pareto front"] = ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls="--",
                                         color="0.5", label="Pareto front")[0]
        ax.set(xscale="log", xlabel="trainable parameters", ylabel=f"{groups.metric(task)} x100", title=task)
    fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8)
    return save(fig, out, "params_vs_metric")


def _curves(ax, runs: list[RunRecord], label: str, color: str, pick) -> None:
    """Mean over runs of the series `pick(run)` {step: value} on their common steps, with a ±std band."""
    import numpy as np

    series = [pick(r) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return
    ys = np.array([[s[k] for k in steps] for s in series], dtype=float)
    mean = np.nanmean(ys, axis=0)
    ax.plot(steps, mean, color=color, label=label)
    if len(series) > 1:
        std = np.nanstd(ys, axis=0, ddof=1)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _per_method_curves(groups: Groups, out: Path, name: str, title: str, ylabel, pick) -> list[str]:
    fig, axes = figure(len(groups.tasks), title)
    for ax, task in zip(axes, groups.tasks):
        for i, m in enumerate(groups.methods):
            if (task, m) in groups.by:
                _curves(ax, groups.by[(task, m)], m, f"C{i % 10}", pick)
        ax.set(xlabel="step", ylabel=ylabel(task), title=task)
        ax.legend(fontsize=8)
    return save(fig, out, name)


def _eval_series(r: RunRecord) -> dict[int, float]:
    split = next(iter(r.results.eval_splits or {None: None}))
    return {e["step"]: e.get(r.metric) for e in r.records
            if e.get("kind") == "eval" and e.get("split", split) == split and e.get(r.metric) is not None}


def plot_loss(groups: Groups, out: Path) -> list[str]:
    """Training loss vs step per task: mean over seeds per method, a ±std band."""
    def pick(r: RunRecord):
        return {e["step"]: e["loss"] for e in r.records if e.get("kind", "train") == "train" and "loss" in e}
    if not any(pick(r) for r in groups.runs):
        return []
    return _per_method_curves(groups, out, "loss_curves", "Training loss", lambda t: "training loss", pick)


def plot_eval(groups: Groups, out: Path) -> list[str]:
    """The main metric vs step, where runs evaluated during training (two evaluations or more)."""
    if not any(len(_eval_series(r)) > 1 for r in groups.runs):
        return []
    return _per_method_curves(groups, out, "eval_curves", "Evaluation during training",
                              groups.metric, _eval_series)


def plot_heatmap(groups: Groups, out: Path) -> list[str]:
    """The main metric x100 over (N1, N2), averaged over the spafit runs at each split: a panel per
    task and group-3 variant (LoRA + bias, LoRA only)."""
    import numpy as np

    strata = [r for r in groups.runs if r.results.n1 is not None and r.value is not None]
    if len({(r.results.n1, r.results.n2) for r in strata}) < 2:
        return []
    panels = sorted({(r.task, r.stratum3) for r in strata})
    fig, axes = figure(len(panels), "SPAFIT: main metric x100 over (N1, N2)", 4.5, 4.0)
    for ax, (task, variant) in zip(axes, panels):
        runs = [r for r in strata if (r.task, r.stratum3) == (task, variant)]
        n1s, n2s = sorted({r.results.n1 for r in runs}), sorted({r.results.n2 for r in runs})
        grid = np.full((len(n1s), len(n2s)), np.nan)
        for a, n1 in enumerate(n1s):
            for b, n2 in enumerate(n2s):
                mean = mean_std([r.value for r in runs if (r.results.n1, r.results.n2) == (n1, n2)])[0]
                grid[a, b] = np.nan if mean is None else mean
        image = ax.imshow(100 * grid, cmap="viridis", origin="lower", aspect="auto")
        middle = 50 * (np.nanmin(grid) + np.nanmax(grid))
        for (a, b), v in np.ndenumerate(100 * grid):
            if np.isfinite(v):
                ax.text(b, a, f"{v:.1f}", ha="center", va="center", color="k" if v > middle else "w", fontsize=9)
        ax.set(xticks=range(len(n2s)), xticklabels=n2s, yticks=range(len(n1s)), yticklabels=n1s,
               xlabel=f"N2 ({variant} from layer)", ylabel="N1 (bias only from layer)",
               title=task if len({v for _, v in panels}) == 1 else f"{task}: group 3 {variant}")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return save(fig, out, "heatmap_n1_n2")


def layer_kinds(run: RunRecord) -> list[str] | None:
    """What each encoder layer of a run trains, one of `plan.LAYER_KINDS` per layer: from its results.json
    (`Plan.layer_kinds`), or for results written before it held them, from the plan of its config.yaml
    (`loading.plan_of_shapes`). None when neither is available."""
    if run.results.layer_kinds:
        return list(run.results.layer_kinds)
    from spafit_jax.training import loading

    return None if run.config is None else loading.plan_of_shapes(run.config).layer_kinds()


def plot_strata(groups: Groups, out: Path) -> list[str]:
    """Layers x methods, each cell coloured by what that layer trains (frozen, bias only, LoRA (+ bias), all)."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = {}
    for m in groups.methods:
        run = next((r for r in groups.runs if r.method == m and (r.results.layer_kinds or r.config)), None)
        try:
            rows[m] = layer_kinds(run) if run is not None else None
        except SpafitError:  # an older run whose model cannot be resolved here (a hub model not in the cache)
            rows[m] = None
    rows = {m: k for m, k in rows.items() if k}
    if not rows:
        return []
    names, width = list(KINDS), max(len(k) for k in rows.values())
    grid = np.full((len(rows), width), np.nan)
    for i, kinds in enumerate(rows.values()):
        grid[i, :len(kinds)] = [names.index(k) for k in kinds]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 3.4 + 0.35 * width), 1.2 + 0.4 * len(rows)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid, cmap=ListedColormap(list(KINDS.values())), vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
    ax.set(xticks=range(width), yticks=range(len(rows)), yticklabels=list(rows), title="What each encoder layer trains",
           xlabel="encoder layer (embeddings: frozen but in full; the head always trains)")
    ax.set_xticks(np.arange(-0.5, width), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="w", linewidth=2)
    ax.tick_params(which="minor", length=0)
    used = sorted({k for kinds in rows.values() for k in kinds}, key=names.index)
    ax.legend(handles=[Patch(color=KINDS[k], label=k) for k in used], loc="center left", bbox_to_anchor=(1.01, 0.5),
              fontsize=8, frameon=False)
    return save(fig, out, "strata")


PICTURES = {"params_vs_metric": plot_params_vs_metric, "loss_curves": plot_loss, "eval_curves": plot_eval,
            "heatmap_n1_n2": plot_heatmap, "strata": plot_strata}
