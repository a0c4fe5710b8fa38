"""Report token ids to fixed length on the pipeline side (DALI ops).

`ids.i32` (or `report.ids.i32`) holds `[CLS] ... [SEP]` without padding (absent -> empty). Output:
`ids` of exactly `length` tokens, padded with the pad id, and when the report is longer the last
kept token is replaced by [SEP] so that a sequence always ends with [SEP]; `attention_mask` is 1
on real tokens. Samples without a report get all pad ids and an all-zero mask. A tokenizer without
[SEP] (MRM's, `sep_id=None`) writes `[CLS] ...` and a long report is simply cut, as MRM's
`tokenizer.enable_truncation(100)` does.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode


def pad_truncate(ids: DataNode, *, length: int, pad_id: int, sep_id: int | None) -> tuple[DataNode, DataNode]:
    """int32 ids of any length -> (ids int64 [length], attention_mask int64 [length])."""
    n = ids.shape(dtype=types.INT32)[0]
    out = fn.slice(ids, 0, length, axes=[0], out_of_bounds_policy="pad", fill_values=pad_id)
    pos = types.Constant(np.arange(length, dtype=np.int32))
    if sep_id is not None:
        put_sep = (pos == length - 1) & (n > length)
        out = out * (1 - put_sep) + sep_id * put_sep
    mask = pos < n
    return fn.cast(out, dtype=types.INT64), fn.cast(mask, dtype=types.INT64)
