"""The in-training monitor: every `monitor.every_epochs` epochs, the cached-feature linear probe of
`cxrfast eval` (`cxrfast.eval.linprobe.probe`) on a held-out labelled shard folder, with the
encoder being trained, so a run shows whether it learns long before it ends.

Every rank gathers the fp32 master weights (`export.fp32_state`, a collective); rank 0 loads them
into an fp32 copy of the method, builds the timm encoder of `method.encoder_export()` and probes it
(features of the monitor folder's splits, a head per the protocol on `monitor.fraction` of its train
patients, selected on validate, scored on test) while the other ranks wait. Per-label and mean test
AUC and the cost in seconds go to metrics.jsonl and TensorBoard (`monitor_*`); the probe's
evaluation folder is kept as OUT/monitor/epoch-NNNN/ (results.json, plots, predictions).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from cxrfast.config import RunConfig
from cxrfast.methods.base import Method
from cxrfast.shards.folder import open_shards
from cxrfast.shards.shard_set import ShardSet
from cxrfast.trainer.checkpoint import RunState
from cxrfast.trainer.distributed import on_rank_zero
from cxrfast.trainer.export import fp32_state, load_full_state
from cxrfast.trainer.metrics import MetricsLogger

log = logging.getLogger(__name__)


class Monitor:
    """The monitor of one run (every rank holds one; rank 0 probes)."""

    def __init__(self, cfg: RunConfig, train_shards: ShardSet, out: Path, *, rank: int) -> None:
        from cxrfast.eval.samples import labelled_splits
        from cxrfast.eval.tasks import get_task, task_labels

        m = cfg.monitor
        self.cfg, self.train_shards, self.out, self.rank = cfg, train_shards, Path(out), rank
        self.protocol = m.protocol_settings()
        # The monitor folder is checked before training (the same answer on every rank).
        self.shards = open_shards(Path(str(m.shards)))
        labels = task_labels(get_task(m.task), self.shards)
        data = self.protocol.data
        labelled_splits(self.shards, labels, policy=data.policy, views=data.views, not_mentioned=data.not_mentioned)
        self._method: Method | None = None  # rank 0's fp32 copy, built once

    def due(self, epoch: int) -> bool:
        return epoch % self.cfg.monitor.every_epochs == 0

    def run(self, engine: Any, state: RunState, metrics: MetricsLogger) -> None:
        """Probe the current weights (collective) and log the AUCs with the cost."""
        t0 = time.perf_counter()
        full = fp32_state(engine, rank=self.rank)
        record = on_rank_zero(lambda: self._probe(full, state), rank=self.rank)
        if record is None:
            return
        record["monitor_seconds"] = time.perf_counter() - t0
        metrics.write(state.step, {"epoch": state.epoch, **record})
        log.info("monitor after epoch %d: %s test mean AUC %s (%s, fraction %g) in %.1f s", state.epoch,
                 self.cfg.monitor.task, _fmt(record.get("monitor_auc_mean")), self.cfg.monitor.protocol,
                 self.cfg.monitor.fraction, record["monitor_seconds"])  # fmt: skip

    def encoder(self, full: dict[str, Any]):
        """The timm encoder of `method.encoder_export()` with the weights `full` (rank 0)."""
        import timm

        from cxrfast.methods import build_method

        if self._method is None:
            self._method = build_method(self.cfg.method, self.train_shards).float().eval()
        load_full_state(self._method, full)
        export = self._method.encoder_export()
        model = timm.create_model(export.arch, pretrained=False, **export.kwargs)
        model.load_state_dict(export.state_dict, strict=True)
        return model.eval(), export

    def _probe(self, full: dict[str, Any], state: RunState) -> dict[str, Any]:
        from cxrfast.config import apply_overrides
        from cxrfast.eval.linprobe import probe

        encoder, export = self.encoder(full)
        proto = self.protocol
        extra = []
        if proto.data.mean is None and proto.data.std is None and export.mean is not None and export.std is not None:
            extra += [f"data.mean={export.mean}", f"data.std={export.std}"]  # the pre-training's normalisation
        if self.cfg.monitor.pooling == "auto" and proto.probe.pooling == "cls" and getattr(encoder, "cls_token", None) is None:
            extra.append("probe.pooling=gap")  # no class token (a CNN): the global average
        proto = apply_overrides(dataclasses.replace(proto), extra) if extra else proto
        res = probe(encoder, self.shards, self.cfg.monitor.task, cache_key=f"{self.out.resolve()}@step-{state.step}",
                    protocol=proto, out=self.out / "monitor" / f"epoch-{state.epoch:04d}",
                    name=f"{self.cfg.preset} epoch {state.epoch}")  # fmt: skip
        fraction = proto.data.fractions[0]
        rows = {r["label"]: r for r in res["summary"] if r["split"] == "test" and r["fraction"] == fraction}
        record: dict[str, Any] = {"monitor_auc_mean": rows["mean"]["mean"]}
        record.update({f"monitor_auc/{name}": rows[name]["mean"] for name in res["labels"]})
        val = [r for r in res["summary"] if r["split"] == "validate" and r["fraction"] == fraction and r["label"] == "mean"]
        record["monitor_val_auc_mean"] = val[0]["mean"] if val else None
        return record


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"
