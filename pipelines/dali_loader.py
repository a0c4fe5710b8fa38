"""The DALI backend: the augmentation graph wrapped in DALI's PyTorch iterator.

Last-batch policy, chosen explicitly: `LastBatchPolicy.PARTIAL` by default (with the reader's
`pad_last_batch=True`): every sample exactly once per epoch across ranks, the last batch of a
rank may be short, and all ranks yield the same number of batches. `drop_last=True` selects
`LastBatchPolicy.DROP`: full batches only, up to batch_size - 1 samples per rank left out.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from cxrfast.pipelines.dali_graph import GraphConfig, cxr_pipeline, output_names
from cxrfast.pipelines.reader import READER_NAME


def key_from_source_info(raw: torch.Tensor) -> str:
    """Zero-padded bytes of DALI's source_info `.../train-000001.tar:34816:KEY.jpg` -> `KEY`."""
    info = bytes(raw.cpu().numpy().tobytes()).rstrip(b"\0").decode()
    member = info.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return member.split(".", 1)[0]


class DaliLoader:
    """Iterable over one epoch per `iter()`; yields the batch dict on the pipeline's device.

    DALI cannot rewind mid-epoch: after a `break`, the next `iter()` continues the same epoch."""

    def __init__(
        self,
        cfg: GraphConfig,
        *,
        batch_size: int,
        num_threads: int,
        device_id: int | None,
        out_dtype: torch.dtype,
        fp32_outputs: tuple[str, ...] = (),
        drop_last: bool = False,
        checkpointing: bool = False,
        checkpoint: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.out_dtype = out_dtype
        self.fp32_outputs = frozenset(fp32_outputs)
        self._names = output_names(cfg)
        self.pipeline = cxr_pipeline(
            cfg,
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            seed=cfg.seed + cfg.rank,
            prefetch_queue_depth=2,
            enable_checkpointing=checkpointing,
            checkpoint=checkpoint,
            enable_conditionals=cfg.augmentation.rand_augment is not None,  # RandAugment picks ops per sample with `if`
        )
        self.pipeline.build()
        self._iterator = DALIGenericIterator(
            [self.pipeline],
            self._names,
            reader_name=READER_NAME,
            last_batch_policy=LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL,
            auto_reset=True,
        )
        self._epoch = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self._iterator)

    @property
    def epoch_samples(self) -> int:
        """Samples this rank yields in the coming epoch. Without shuffling the reader moves each
        rank to the next part of the data every epoch (parts differ by at most one sample, so this
        can change by one between epochs); with shuffling (`shuffle_after_epoch`) a rank keeps its
        part and the tar order is reshuffled instead. With drop_last: len(self) * batch_size."""
        if self.drop_last:
            return len(self) * self.batch_size
        meta = self.pipeline.reader_meta(READER_NAME)
        n, w = int(meta["epoch_size"]), int(meta["number_of_shards"])
        part = int(meta["shard_id"]) if meta["stick_to_shard"] else (int(meta["shard_id"]) + self._epoch) % w
        return (part + 1) * n // w - part * n // w

    def state(self) -> bytes:
        """DALI's checkpoint of the batches consumed so far (reader position, random generators);
        `build_loader(..., checkpoint=state)` continues from there. Needs `checkpointing=True`."""
        return self._iterator.checkpoints()[0]

    def __iter__(self) -> Iterator[dict]:
        for out in self._iterator:  # auto_reset: the iterator rewinds itself at the end of the epoch
            yield self._to_batch(out[0])
        self._epoch += 1

    def _to_batch(self, out: dict[str, torch.Tensor]) -> dict:
        batch: dict = {}
        for name, t in out.items():
            if name == "key":
                batch["key"] = [key_from_source_info(row) for row in t]
            elif t.is_floating_point() and name not in self.fp32_outputs and t.dtype != self.out_dtype:
                batch[name] = t.to(self.out_dtype)  # bf16: DALI has no bfloat16 output
            else:
                batch[name] = t
        return batch
