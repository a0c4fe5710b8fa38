"""The synthetic backend: batches of random tensors with the augmentation's shapes and dtypes, made once
on the device and yielded `len()` times, so a training step can be timed without any data work."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from cxrfast.pipelines.augmentations import Augmentation


class SyntheticLoader:
    """Same batch dict, len and epoch_samples as the real backends for the given sample count;
    `num_labels` codes per sample in `labels` (None: no `labels`, as when none are asked for)."""

    def __init__(
        self,
        augmentation: Augmentation,
        *,
        samples: int,
        batch_size: int,
        num_labels: int | None,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        fp32_outputs: tuple[str, ...] = (),
        channels: int = 1,
        image_size: int | None = None,
        text_len: int | None = None,
        vocab_size: int | None = None,
        special_ids: dict[str, int] | None = None,
        seed: int = 0,
        with_keys: bool = False,
        drop_last: bool = False,
    ) -> None:
        if samples < 1 or batch_size < 1 or (num_labels is not None and num_labels < 1):
            raise ValueError(f"samples, batch_size and num_labels must be >= 1, got {samples}, {batch_size}, {num_labels}")
        if text_len is not None and (vocab_size is None or special_ids is None):
            raise ValueError(f"augmentation {augmentation.name!r} has text: pass vocab_size and special_ids (or a manifest with a tokenizer)")
        self.samples, self.batch_size, self.drop_last, self.with_keys = samples, batch_size, drop_last, with_keys
        g = torch.Generator().manual_seed(seed)
        b = batch_size
        batch: dict[str, torch.Tensor] = {}
        for name, side in augmentation.sizes(image_size).items():
            gray = torch.randn(b, 1, side, side, generator=g).to(torch.float32 if name in fp32_outputs else dtype)
            batch[name] = gray.expand(-1, channels, -1, -1).contiguous()  # replicated like the real backends
        if num_labels is not None:
            batch["labels"] = torch.randint(-2, 2, (b, num_labels), generator=g, dtype=torch.int8)
        if text_len is not None:
            assert special_ids is not None and vocab_size is not None
            first = max(special_ids.values()) + 1
            ids = torch.randint(first, vocab_size, (b, text_len), generator=g)
            lengths = torch.randint(2, text_len + 1, (b,), generator=g)
            pos = torch.arange(text_len)
            mask = pos[None, :] < lengths[:, None]
            ids[:, 0] = special_ids["cls"]
            if "sep" in special_ids:  # MRM's tokenizer has no [SEP]
                ids[torch.arange(b), lengths - 1] = special_ids["sep"]
            ids[~mask] = special_ids["pad"]
            batch["ids"], batch["attention_mask"] = ids, mask.long()
        self._batch = {k: v.to(device) for k, v in batch.items()}

    def __len__(self) -> int:
        return self.samples // self.batch_size if self.drop_last else math.ceil(self.samples / self.batch_size)

    @property
    def epoch_samples(self) -> int:
        return len(self) * self.batch_size if self.drop_last else self.samples

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            n = min(self.batch_size, self.samples - i * self.batch_size)
            batch: dict = {k: v[:n] for k, v in self._batch.items()}
            if self.with_keys:
                batch["key"] = [f"synthetic-{i * self.batch_size + j}" for j in range(n)]
            yield batch
