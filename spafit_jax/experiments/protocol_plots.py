"""The protocol's pictures: the dev score over each method's searched values, and the search cells' training losses."""

from __future__ import annotations

import math
from pathlib import Path

from spafit_jax.training import metricslog, rundir
from spafit_jax.experiments.protocol_files import ProtocolError, read_json


def _value(point: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k, v in point.items())


def _dev_points(exp: Path, index: dict) -> dict:
    """{panel: {(method, the other searched keys): [(value, dev score, metric)]}} of the finished search cells, by the
    first searched key; a panel per task (and budget): a line per method and value of its other keys (SPAFIT's
    strata searched with the rate: one line per (n1, n2))."""
    out: dict = {}
    for e in index["search"]:
        folder = exp / e["folder"]
        if not (folder / rundir.RESULTS).is_file():
            continue
        res = read_json(folder / rundir.RESULTS, "the run is damaged: delete its folder and rerun the experiment")
        value = next(iter(e["point"].values()), None)
        best, dev = res.get("best"), res.get("eval")
        if not isinstance(best, dict) or not isinstance(dev, dict) or best.get("metric") not in dev:
            raise ProtocolError(f"{folder / rundir.RESULTS} lacks its best metric's dev score; delete the folder "
                                "and rerun the experiment")
        score = dev[best["metric"]]  # null where the score was not finite
        if isinstance(value, (int, float)) and isinstance(score, (int, float)) and math.isfinite(score):
            panel = f"{e['task']}, budget {e['budget']}" if e.get("budget") else e["task"]
            rest = tuple(list(e["point"].items())[1:])
            out.setdefault(panel, {}).setdefault((e["task"], e["method"], rest), []).append(
                (value, score, res["best"]["metric"]))
    return out


def plot_dev_curves(exp: Path, index: dict, out: Path) -> list[str]:
    """dev_curves.png/svg: dev score vs the first searched value (log x), a line per method (and value of its other
    searched keys), one panel per task (and budget); chosen values ringed."""
    from spafit_jax.experiments.pictures import MARKERS, figure, save

    points = _dev_points(exp, index)
    if not points:
        return []
    key = next(iter(index["search"][0]["point"]))
    fig, axes = figure(len(points), f"Dev score vs {key} (chosen value ringed)")
    for ax, (panel, lines) in zip(axes, points.items()):
        for i, ((task, m, rest), pts) in enumerate(lines.items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}",
                    label=f"{m} {_value(dict(rest))}" if rest else m)
            chosen = index["choices"].get(f"{task}/{m}")
            if chosen and chosen["chosen"] is not None and tuple(list(chosen["chosen"].items())[1:]) == rest:
                ax.plot([next(iter(chosen["chosen"].values()))], [100 * chosen["dev"]], "o", ms=12, mfc="none",
                        color=f"C{i % 10}")
        ax.set(xscale="log", xlabel=key, ylabel=f"dev {pts[0][2]} x100", title=panel)
        ax.legend(fontsize=7)
    return save(fig, out, "dev_curves")


def _losses(folder: Path) -> dict[int, float]:
    path = folder / rundir.METRICS
    if not path.is_file():
        return {}
    try:
        records = metricslog.read_metrics(path)
    except OSError as e:
        raise ProtocolError(f"{path} cannot be read ({e.strerror or e}); move it aside") from None
    return {r["step"]: r["loss"] for _, r in records if r.get("kind", "train") == "train"
            and isinstance(r.get("loss"), (int, float))}


def plot_train_loss(exp: Path, index: dict, out: Path) -> list[str]:
    """train_loss.png/svg: training loss vs step of every searched value per method (the chosen one solid), one
    panel per task and method: whether the budget let each method converge at its chosen value."""
    from spafit_jax.experiments.pictures import figure, save

    panels: dict = {}
    for e in index["search"]:
        losses = _losses(exp / e["folder"])
        if losses:
            panels.setdefault((e["task"], e["method"]), []).append((e, losses))
    if not panels:
        return []
    fig, axes = figure(len(panels), "Training loss (chosen value solid)", width=3.4, height=2.6)
    for ax, ((task, method), runs) in zip(axes, panels.items()):
        chosen = (index["choices"].get(f"{task}/{method}") or {}).get("label")
        for i, (e, losses) in enumerate(runs):
            steps = sorted(losses)
            ax.plot(steps, [losses[k] for k in steps], color=f"C{i % 10}", ls="-" if e["label"] == chosen else ":",
                    label=_value(e["point"]))
        ax.set(title=f"{task} / {method}", xlabel="step", ylabel="training loss")
        ax.legend(fontsize=6)
    return save(fig, out, "train_loss")
