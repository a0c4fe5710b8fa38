"""`cxrfast eval compare EVAL_A EVAL_B ...`: encoders side by side on the same test patients, with a
paired bootstrap CI of each difference to the first (e.g. pre-trained minus random init).

The evaluations must share the task, labels, policy, views and shard folder (so the test samples
are the same). For each common fraction, every draw of every encoder is resampled with the same
patient resamples; the difference of the draw-averaged mean AUCs is computed per resample, and
its percentile interval is the CI. The mean runs over the labels defined in every draw of every
encoder at that fraction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cxrfast.eval import report
from cxrfast.eval.metrics import auc_per_label, bootstrap_aucs, percentile_ci
from cxrfast.eval.results import RESULTS, load_config, write_json
from cxrfast.eval.summary import load_fraction, summarize

#: What must be equal for two evaluations to be compared.
SAME = ("task", "labels", "protocol.data.policy", "protocol.data.views", "protocol.data.not_mentioned",
        "shards.manifest_sha256")  # fmt: skip


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def compare(folders: list[Path], *, boot: int | None = None, seed: int | None = None, level: float | None = None,
            out: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Compare evaluation folders; returns (and with `out`, writes compare.json and the plot)."""
    if len(folders) < 2:
        raise ValueError("compare needs at least two evaluation folders")
    cfgs = [load_config(f) for f in folders]
    for key in SAME:
        values = [_get(c, key) for c in cfgs]
        if any(v != values[0] for v in values[1:]):
            listing = ", ".join(f"{f}: {v!r}" for f, v in zip(folders, values, strict=True))
            raise ValueError(f"evaluations differ in {key} ({listing}); compare needs the same test set and labels")
    data0 = cfgs[0]["protocol"]["data"]
    boot = boot or data0["boot"]
    seed = data0["seed"] if seed is None else seed
    level = level or data0["ci"]
    labels = cfgs[0]["labels"]
    names = [c["encoder"]["name"] for c in cfgs]
    if len(set(names)) < len(names):
        names = [f"{n} ({f.name})" for n, f in zip(names, folders, strict=True)]
    fractions = sorted(set.intersection(*(set(c["protocol"]["data"]["fractions"]) for c in cfgs)))
    rows = []
    for fraction in fractions:
        fps = [load_fraction(f, c, fraction, "test") for f, c in zip(folders, cfgs, strict=True)]
        if any(fp is None for fp in fps):
            continue
        for f, fp in zip(folders[1:], fps[1:], strict=True):
            if not np.array_equal(fp.keys, fps[0].keys):
                raise ValueError(f"{f}: test samples at fraction {fraction:g} differ from {folders[0]}'s")
        scores = np.concatenate([fp.scores for fp in fps])
        reps = bootstrap_aucs(scores, fps[0].targets, fps[0].subjects, n_boot=boot, seed=seed)
        defined = np.concatenate([[[r is None for r in row] for row in fp.train_reason] for fp in fps])
        pos, neg = (fps[0].targets == 1).sum(0), (fps[0].targets == 0).sum(0)
        defined &= (pos > 0) & (neg > 0)
        common = np.flatnonzero(defined.all(axis=0))
        if common.size == 0:
            rows.append({"fraction": fraction, "undefined": "no label is defined in every draw of every encoder"})
            continue
        point = np.stack([auc_per_label(s, fps[0].targets) for s in scores])[:, common].mean(axis=1)
        per_rep = reps[:, :, common].mean(axis=2)  # [M, B]
        start, enc_point, enc_reps = 0, [], []
        for fp in fps:
            m = len(fp.draws)
            enc_point.append(float(point[start : start + m].mean()))
            enc_reps.append(per_rep[start : start + m].mean(axis=0))
            start += m
        entries = []
        for i, name in enumerate(names):
            ci = percentile_ci(enc_reps[i], level)
            e: dict[str, Any] = {"name": name, "folder": str(folders[i]), "draws": len(fps[i].draws),
                                 "mean_auc": enc_point[i], "ci": list(ci) if ci else None}  # fmt: skip
            if i:
                diff = enc_reps[i] - enc_reps[0]
                dci = percentile_ci(diff, level)
                finite = diff[np.isfinite(diff)]
                e["diff_vs_first"] = enc_point[i] - enc_point[0]
                e["diff_ci"] = list(dci) if dci else None
                e["p_boot"] = float(min(1.0, 2 * min((finite <= 0).mean(), (finite >= 0).mean()))) if finite.size else None
            entries.append(e)
        rows.append({"fraction": fraction, "labels_in_mean": [labels[c] for c in common], "encoders": entries})
    result = {"task": cfgs[0]["task"], "policy": data0["policy"], "views": data0["views"], "boot": boot, "seed": seed,
              "ci_level": level, "names": names, "rows": rows}  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "compare.json", result)
        curves = []
        for f, name in zip(folders, names, strict=True):
            res = json.loads((f / RESULTS).read_text()) if (f / RESULTS).is_file() else summarize(f)
            curves.append(report.curve_from_summary(res, name))
        report.label_efficiency_plot(curves, out / "label_efficiency.png",
                                     title=f"{result['task']} (policy {result['policy']}, views {result['views']})")
    return result


def compare_table(result: dict[str, Any]) -> str:
    from rich.console import Console
    from rich.table import Table

    level = round(100 * result["ci_level"])
    table = Table(title=f"{result['task']} test mean AUC [{level}% CI]; difference to {result['names'][0]} "
                        f"[paired bootstrap {level}% CI, {result['boot']} patient resamples]")  # fmt: skip
    table.add_column("fraction", justify="right")
    for i, name in enumerate(result["names"]):
        table.add_column(name, justify="right")
        if i:
            table.add_column(f"Δ {name}", justify="right")
    for row in result["rows"]:
        if "encoders" not in row:
            table.add_row(f"{row['fraction']:g}", row["undefined"])
            continue
        cells = []
        for i, e in enumerate(row["encoders"]):
            ci = f" [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]" if e["ci"] else ""
            cells.append(f"{e['mean_auc']:.3f}{ci}")
            if i:
                dci = f" [{e['diff_ci'][0]:+.3f}, {e['diff_ci'][1]:+.3f}]" if e["diff_ci"] else ""
                cells.append(f"{e['diff_vs_first']:+.3f}{dci}")
        table.add_row(f"{row['fraction']:g}", *cells)
    console = Console(width=max(100, 34 * (2 * len(result["names"]))), record=True)
    with console.capture() as cap:
        console.print(table)
    return cap.get()
