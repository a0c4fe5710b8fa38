"""Fixed 2-D sine-cosine positional embeddings (MAE, MoCo v3; and MRM's variant), in torch.

The first half of the channels encodes one grid axis and the second half the other, each as
`[sin(pos * omega), cos(pos * omega)]` over d = D/2 channels (so d/2 frequencies, i = 0 .. d/2-1):

- "mae": `omega_i = 1 / 10000 ** (i / (d / 2))` (MAE util/pos_embed.py: `omega /= embed_dim / 2.`);
- "mrm": `omega_i = 1 / 10000 ** (i / d / 2)` (MRM util/pos_embed.py:57: `omega = omega / embed_dim / 2.`,
  the same line with the division order changed): exponents 4x smaller, so the frequencies span
  1 .. 10000**-0.25 = 0.1 instead of 1 .. 1e-4.
"""

from __future__ import annotations

import torch

#: The sin-cos table variants by name.
VARIANTS = ("mae", "mrm")


def sincos_1d(embed_dim: int, pos: torch.Tensor, variant: str = "mae") -> torch.Tensor:
    """pos [M] -> [M, embed_dim] (embed_dim even): sin half then cos half."""
    if embed_dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dim, got {embed_dim}")
    i = torch.arange(embed_dim // 2, dtype=torch.float64)
    if variant == "mae":
        exponent = i / (embed_dim / 2.0)
    elif variant == "mrm":
        exponent = i / embed_dim / 2.0
    else:
        raise ValueError(f"sin-cos variant must be one of {VARIANTS}, got {variant!r}")
    omega = 1.0 / 10000**exponent  # [D/2]
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False, variant: str = "mae") -> torch.Tensor:
    """[grid_size**2 (+1), embed_dim] float32; row-major over the grid, optional all-zero cls row first.

    Same values and layout as MAE's (variant "mae") or MRM's (variant "mrm") `get_2d_sincos_pos_embed`
    (w is the first grid axis there, giving the column embedding in the first half: we keep that
    exact order).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # each [G, G]; MAE: meshgrid(w, h)
    emb_a = sincos_1d(embed_dim // 2, grid_w, variant)  # MAE's grid[0]
    emb_b = sincos_1d(embed_dim // 2, grid_h, variant)  # MAE's grid[1]
    emb = torch.cat([emb_a, emb_b], dim=1)  # [G*G, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
