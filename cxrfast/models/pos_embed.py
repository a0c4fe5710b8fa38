"""Fixed 2-D sine-cosine positional embeddings (MAE, MoCo v3), in torch.

The first half of the channels encodes the row (h) and the second half the column (w), each
as `[sin(pos * omega), cos(pos * omega)]` with `omega = 1 / 10000 ** (2i / (D/2))`.
"""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, embed_dim] (embed_dim even): sin half then cos half."""
    if embed_dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dim, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """[grid_size**2 (+1), embed_dim] float32; row-major over the grid, optional all-zero cls row first.

    Same values and layout as MAE's `get_2d_sincos_pos_embed` (w is the first grid axis there,
    giving the column embedding in the first half: we keep that exact order).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # each [G, G]; MAE: meshgrid(w, h)
    emb_a = sincos_1d(embed_dim // 2, grid_w)  # MAE's grid[0]
    emb_b = sincos_1d(embed_dim // 2, grid_h)  # MAE's grid[1]
    emb = torch.cat([emb_a, emb_b], dim=1)  # [G*G, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
