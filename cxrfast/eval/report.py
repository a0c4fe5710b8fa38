"""What a person reads: the terminal table and the PNG plots (label-efficiency curve, ROC curves).

`finish(EVAL)` computes every number from the evaluation folder's predictions (results.json) and
draws its plots, whatever produced the predictions (the linear probe or a fine-tune).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrfast.eval import summary
from cxrfast.eval.results import load_config


def _fmt(row: dict[str, Any]) -> str:
    if row["mean"] is None:
        return "undefined"
    text = f"{row['mean']:.3f}"
    if row.get("n_draws", 1) > 1:
        text += f" ±{row['std']:.3f}"
    if row.get("ci"):
        text += f" [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]"
    return text


def results_table(results: dict[str, Any], split: str = "test") -> str:
    """Rows = labels + mean, columns = fractions: mean AUC over draws ± std [95% CI], plus test counts."""
    from rich.console import Console
    from rich.table import Table

    rows = [r for r in results["summary"] if r["split"] == split]
    fractions = sorted({r["fraction"] for r in rows})
    level = round(100 * results["ci_level"])
    table = Table(title=f"{results['encoder']}: {results['task']} {split} AUC (mean ±std over draws [{level}% CI]), "
                        f"policy {results['policy']}, views {results['views']}")  # fmt: skip
    table.add_column("label")
    for f in fractions:
        table.add_column(f"{100 * f:g}% labels", justify="right")
    table.add_column(f"{split} pos/neg", justify="right")
    by = {(r["label"], r["fraction"]): r for r in rows}
    for name in [*results["labels"], "mean"]:
        cells = [_fmt(by[(name, f)]) if (name, f) in by else "-" for f in fractions]
        first = by.get((name, fractions[0])) if fractions else None
        counts = f"{first['positives']}/{first['negatives']}" if first and "positives" in first else ""
        table.add_row(name, *cells, counts)
    console = Console(width=max(100, 28 * (len(fractions) + 2)), record=True)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_efficiency_plot(curves: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Mean AUC vs label fraction (log x) with CI bands; `curves` = [{"name", "fraction", "mean", "lo", "hi"}]."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for c in curves:
        x = np.asarray(c["fraction"], dtype=float)
        if not x.size:
            continue
        (line,) = ax.plot(x, c["mean"], marker="o", label=c["name"])
        lo, hi = np.asarray(c["lo"], dtype=float), np.asarray(c["hi"], dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(x[ok], lo[ok], hi[ok], alpha=0.2, color=line.get_color())
    ax.set_xscale("log")
    ticks = sorted({f for c in curves for f in c["fraction"]})
    ax.set_xticks(ticks, [f"{100 * f:g}%" for f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("label fraction (share of train patients)")
    ax.set_ylabel("mean AUC (test)")
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curve_from_summary(results: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    rows = sorted((r for r in results["summary"] if r["split"] == "test" and r["label"] == "mean"
                   and r["mean"] is not None), key=lambda r: r["fraction"])  # fmt: skip
    return {
        "name": name or results["encoder"],
        "fraction": [r["fraction"] for r in rows],
        "mean": [r["mean"] for r in rows],
        "lo": [r["ci"][0] if r["ci"] else np.nan for r in rows],
        "hi": [r["ci"][1] if r["ci"] else np.nan for r in rows],
    }


def roc_plot(per_fraction: dict[float, tuple[np.ndarray, np.ndarray]], labels: Sequence[str], path: Path, *,
             title: str) -> Path:  # fmt: skip
    """ROC curve per label (one panel each), one line per fraction: {fraction: (scores [n, L], targets [n, L])}."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    cols = min(5, len(labels))
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.8 * rows), squeeze=False)
    for j, name in enumerate(labels):
        ax = axes[j // cols][j % cols]
        for fraction, (scores, targets) in sorted(per_fraction.items()):
            keep = targets[:, j] >= 0
            y = targets[keep, j]
            if y.min(initial=1) == y.max(initial=0):  # one class only: no curve
                continue
            fpr, tpr, _ = roc_curve(y, scores[keep, j])
            ax.plot(fpr, tpr, lw=1.2, label=f"{fraction:g}")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("FPR", fontsize=7)
        ax.set_ylabel("TPR", fontsize=7)
        ax.tick_params(labelsize=6)
    for j in range(len(labels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(title="fraction", fontsize=6, title_fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish(out: Path) -> dict[str, Any]:
    """results.json, label_efficiency.png and roc.png (draw 0 of each fraction) of the folder `out`."""
    res = summary.summarize(out)
    cfg = load_config(out)
    title = f"{res['encoder']} - {res['task']} ({res['protocol']}, policy {res['policy']}, views {res['views']})"
    label_efficiency_plot([curve_from_summary(res)], out / "label_efficiency.png", title=title)
    per_fraction = {}
    for fraction in cfg["protocol"]["data"]["fractions"]:
        fp = summary.load_fraction(out, cfg, fraction, "test")
        if fp is not None:
            per_fraction[fraction] = (fp.scores[0], fp.targets)
    if per_fraction:
        roc_plot(per_fraction, res["labels"], out / "roc.png", title=f"{title}, draw 0")
    return res
