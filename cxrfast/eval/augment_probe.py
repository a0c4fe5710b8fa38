"""`--augment`: the published per-epoch linear probe. Every epoch the frozen backbone (eval mode, no
gradients) runs over the train split with the protocol's train augmentation; the head trains on
those features. This is what MGCA's `SSLFineTuner` and MoCo-CXR's fc-only training do, at the cost
of a backbone pass per image per epoch; cxrfast's default computes the features once instead.

The loader reads the whole train split each epoch (a DALI reader cannot select keys), so images of
patients outside the draw are decoded and skipped before the backbone; batches are re-formed from
the kept samples so their size is the protocol's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cxrfast.eval.encoders import pooled_features
from cxrfast.eval.features import frozen

if TYPE_CHECKING:
    from cxrfast.eval.linprobe import Engine


@dataclass
class BackboneFeed:
    """Training batches made by the frozen backbone from augmented images of the draw's samples."""

    eng: Engine
    rows: dict[str, np.ndarray]  # sample key -> targets [L] of the draw's train samples
    seed: int

    def _loader(self):
        from cxrfast.pipelines import build_loader

        e, i = self.eng, self.eng.inputs
        return build_loader(
            e.folder, "train", e.protocol.probe.augmentation, batch_size=e.protocol.run.extract_batch_size,
            backend=e.protocol.run.backend, device=i.device, seed=self.seed % 2**31, rank=0, world_size=1,
            shuffle=True, num_threads=e.protocol.run.num_threads, channels=i.channels, mean=i.mean, std=i.std,
            image_size=i.image_size, with_keys=True,
        )  # fmt: skip

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        e = self.eng
        k = e.protocol.probe
        device = e.device
        loader = self._loader()
        while True:  # one pass of the loader = one epoch
            xs: list[torch.Tensor] = []
            ys: list[np.ndarray] = []
            held = made = 0
            for batch in loader:
                keep = [j for j, key in enumerate(batch["key"]) if key in self.rows]
                if not keep:
                    continue
                x = batch["image"][keep].to(device, non_blocking=True)
                with frozen(e.model, device), torch.no_grad(), torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=e.inputs.precision == "bf16"
                ):
                    xs.append(pooled_features(e.model, x, k.pooling).float())
                ys.append(np.stack([self.rows[batch["key"][j]] for j in keep]))
                held += len(keep)
                while held >= k.batch_size:
                    fx, fy = torch.cat(xs), np.concatenate(ys)
                    yield fx[: k.batch_size], torch.from_numpy(fy[: k.batch_size].astype(np.int64)).to(device)
                    xs, ys, held, made = [fx[k.batch_size :]], [fy[k.batch_size :]], held - k.batch_size, made + 1
            if held and (not k.drop_last or made == 0):  # the partial batch (a tiny draw always gets one)
                yield torch.cat(xs), torch.from_numpy(np.concatenate(ys).astype(np.int64)).to(device)
