"""The shard reader: `fn.readers.webdataset` over a split's tars, sharded by rank.

Exact epochs: the reader partitions the samples into `num_shards` contiguous parts and pads
each part with its last sample up to the padded epoch size (`pad_last_batch=True`); the
iterator (`dali_loader.py`, `reader_name="Reader"`) knows the part sizes and cuts the padding
off the last batch, so each sample is yielded once per epoch across ranks. Shuffling: the tar
order is reshuffled every epoch with a seed shared by all ranks (`shuffle_after_epoch`), and
samples are shuffled within a buffer of `initial_fill` with the per-rank pipeline seed.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

from cxrfast.shards.folder import ShardSplit
from cxrfast.shards.schema import MEMBER_BY_EXT, TEXTS

READER_NAME = "Reader"

_DALI_DTYPES = {"i1": types.INT8, "i4": types.INT32}  # little-endian, as DALI reads them


def _dtype(ext: str) -> types.DALIDataType:
    dt = MEMBER_BY_EXT[ext].dtype
    return types.UINT8 if dt is None else _DALI_DTYPES[dt.str[1:]]


def read_shards(
    split: ShardSplit,
    *,
    rank: int,
    world_size: int,
    shuffle: bool,
    seed: int,
    text: str | None,
    initial_fill: int = 1024,
) -> dict[str, DataNode]:
    """{"jpg": encoded bytes, "labels": int8 [len(label_names)], "ids": int32 [n] (only with a `text`: the ids member
    of that report text, `schema.TEXTS[text].ids`)}."""
    exts = ["jpg", "labels.i8"] + ([TEXTS[text].ids] if text is not None else [])
    outs = fn.readers.webdataset(
        paths=[str(p) for p in split.tars],
        index_paths=[str(p) for p in split.idxs],
        ext=exts,
        dtypes=[_dtype(e) for e in exts],
        missing_component_behavior="empty",
        shard_id=rank,
        num_shards=world_size,
        pad_last_batch=True,
        random_shuffle=shuffle,
        initial_fill=max(1, min(initial_fill, split.samples)),
        shuffle_after_epoch=shuffle,
        name=READER_NAME,
        **({"shuffle_after_epoch_seed": seed} if shuffle else {}),  # the same on every rank
    )
    names = ["jpg", "labels", "ids"]  # no zip(strict=): DALI's AutoGraph (RandAugment's conditionals) lacks it
    return {names[i]: out for i, out in enumerate(outs)}
