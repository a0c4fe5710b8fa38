"""The shard reader: `fn.readers.webdataset` over a split's tars (of every folder of a shard set,
concatenated in folder order), sharded by rank.

Exact epochs: the reader partitions the samples into `num_shards` contiguous parts and pads
each part with its last sample up to the padded epoch size (`pad_last_batch=True`); the
iterator (`dali_loader.py`, `reader_name="Reader"`) knows the part sizes and cuts the padding
off the last batch, so each sample is yielded once per epoch across ranks. Shuffling: the tar
order is reshuffled every epoch with a seed shared by all ranks (`shuffle_after_epoch`), and
samples are shuffled within a buffer of `initial_fill` with the per-rank pipeline seed. With
several folders a rank reads a contiguous part of the reshuffled tars, so each rank's share of each
folder varies from epoch to epoch by whole tars; every sample is still read once per epoch.

`folder_flags` tells which folder each sample came from, from the sample's `source_info` (the tar
path DALI read it from), for per-folder normalisation.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

from cxrfast.shards.schema import MEMBER_BY_EXT, TEXTS
from cxrfast.shards.shard_set import SetSplit

READER_NAME = "Reader"

_DALI_DTYPES = {"i1": types.INT8, "i4": types.INT32}  # little-endian, as DALI reads them


def _dtype(ext: str) -> types.DALIDataType:
    dt = MEMBER_BY_EXT[ext].dtype
    return types.UINT8 if dt is None else _DALI_DTYPES[dt.str[1:]]


def read_shards(
    split: SetSplit,
    *,
    rank: int,
    world_size: int,
    shuffle: bool,
    seed: int,
    labels: bool,
    text: str | None,
    initial_fill: int = 1024,
) -> dict[str, DataNode]:
    """{"jpg": encoded bytes, "labels": int8 [num labels] (only with `labels`), "ids": int32 [n] (only
    with a `text`: the ids member of that report text, `schema.TEXTS[text].ids`)}."""
    members = {"jpg": "jpg"} | ({"labels": "labels.i8"} if labels else {})
    members |= {"ids": TEXTS[text].ids} if text is not None else {}
    exts = list(members.values())
    outs = fn.readers.webdataset(
        paths=[str(p.absolute()) for p in split.tars],  # absolute: `folder_flags` matches their folders
        index_paths=[str(p.absolute()) for p in split.idxs],
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
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    names = list(members)  # no zip(strict=): DALI's AutoGraph (RandAugment's conditionals) lacks it
    return {names[i]: outs[i] for i in range(len(names))}


def folder_flags(jpg: DataNode, split: SetSplit) -> list[DataNode]:
    """Per folder of `split`, a per-sample float 1.0 when the sample was read from a tar of that folder
    (its `source_info`, "TAR:OFFSET:MEMBER", starts with the folder's absolute path), else 0.0.
    Exactly one flag is 1 per sample: a set's folders are distinct and not nested."""
    info = fn.get_property(jpg, key="source_info")
    flags = []
    for root in split.shards.roots:
        prefix = np.frombuffer(f"{root.absolute()}/".encode(), dtype=np.uint8)
        head = fn.slice(info, 0, len(prefix), axes=[0], out_of_bounds_policy="pad", fill_values=0)
        same = fn.cast(head == types.Constant(prefix), dtype=types.FLOAT)
        flags.append(fn.reductions.min(same))
    return flags
