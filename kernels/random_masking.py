"""MAE random masking: per-sample noise -> keep/restore indices -> gather of the visible tokens.

`random_masking(x, pos, ratio, generator)` returns `Masked(x, mask, ids_keep, ids_restore)`:

- noise `[B, N]` comes from `torch.rand(B, N, generator=generator, device=x.device)`, so both
  implementations see the same noise for the same generator state and return identical indices;
- the `K = int(N * (1 - ratio))` (clamped to `[1, N]`) tokens with the lowest noise are kept,
  `ids_keep` in order of increasing noise (as MAE), `ids_restore` the inverse permutation;
- `mask[b, n]` is 0 for kept and 1 for removed patches, in the original patch order.

The argsort of the noise stays in PyTorch: it is a `[B, N]` segmented sort (B*N = 50k keys for
ViT-B MAE), negligible next to the `[B, N, D]` traffic; `tl.sort` has no index output and needs
power-of-2 lengths; and the torch sort gives the two implementations bit-identical indices. The
Triton kernel fuses what touches `[B, N, D]`: forward, `(x + pos)` gathered at `ids_keep` in one
pass (no `x + pos` temporary) together with the mask; backward, one pass that writes `grad_x`
(a gather through `ids_restore`, so no zero-fill + scatter) and, for a broadcast `pos [1, N, D]`,
sums `grad_pos` over chunks of 16 samples in fp32 registers; the launcher adds the per-chunk partial
sums (no atomics, deterministic).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._dispatch import resolve_impl


class Masked(NamedTuple):
    """Result of `random_masking`."""

    x: torch.Tensor
    """[B, K, D] (x + pos) at ids_keep, dtype = promote_types(x.dtype, pos.dtype)."""
    mask: torch.Tensor
    """[B, N] float32, 0 keep, 1 removed, original patch order."""
    ids_keep: torch.Tensor
    """[B, K] int64, kept patch indices in order of increasing noise."""
    ids_restore: torch.Tensor
    """[B, N] int64, argsort of the shuffle: position of each patch in the shuffled order."""


def keep_count(num_patches: int, ratio: float) -> int:
    """K = int(N * (1 - ratio)) as in MAE, clamped to [1, N]."""
    return min(num_patches, max(1, int(num_patches * (1.0 - ratio))))


def _validate(x: torch.Tensor, pos: torch.Tensor, ratio: float) -> None:
    if x.dim() != 3:
        raise ValueError(f"random_masking: x must be [B, N, D], got shape {tuple(x.shape)}")
    if pos.dim() != 3 or pos.shape[1:] != x.shape[1:] or pos.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"random_masking: pos must be [1 or B, N, D] = [1|{x.shape[0]}, {x.shape[1]}, {x.shape[2]}], "
            f"got {tuple(pos.shape)}"
        )
    if not (x.is_floating_point() and pos.is_floating_point()):
        raise ValueError(f"random_masking: x and pos must be floating point, got {x.dtype} and {pos.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"random_masking: empty input of shape {tuple(x.shape)}")
    if not isinstance(ratio, (float, int)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"random_masking: ratio must be a float in [0, 1), got {ratio!r}")


def shuffle_indices(
    batch: int, num_patches: int, ratio: float, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids_keep [B, K], ids_restore [B, N], K) from fresh noise; shared by both implementations."""
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    # Inverse permutation (= MAE's argsort(ids_shuffle)) by one scatter instead of a second sort.
    ids_restore = torch.empty_like(ids_shuffle)
    ids_restore.scatter_(1, ids_shuffle, torch.arange(num_patches, device=device).expand(batch, -1))
    k = keep_count(num_patches, ratio)
    return ids_shuffle[:, :k].contiguous(), ids_restore, k


def random_masking_reference(
    x: torch.Tensor, pos: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> Masked:
    """Plain PyTorch, the single source of truth (MAE `random_masking` with pos added first)."""
    _validate(x, pos, ratio)
    b, n, d = x.shape
    ids_keep, ids_restore, k = shuffle_indices(b, n, ratio, generator, x.device)
    x_masked = torch.gather(x + pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masked(x_masked, mask, ids_keep, ids_restore)


# --------------------------------------------------------------------------------------- Triton


@triton.jit
def _gather_add_fwd_kernel(
    x_ptr,  # [B, N, D] any strides
    pos_ptr,  # [1|B, N, D] any strides (stride_pb = 0 when broadcast)
    ids_keep_ptr,  # [B, K] int64, contiguous
    ids_restore_ptr,  # [B, N] int64, contiguous
    out_ptr,  # [B, K, D] contiguous
    mask_ptr,  # [B, N] float32, contiguous
    N,
    K,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_pb,
    stride_pn,
    stride_pd,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 outputs
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (b, kb): out[b, kb*BLOCK_K:...] = x[b, ids] + pos[b|0, ids]; kb == 0 also writes mask[b]."""
    b = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    idx = tl.load(ids_keep_ptr + b * K + offs_k, mask=k_ok, other=0)
    x_rows = x_ptr + b * stride_xb + idx[:, None] * stride_xn
    p_rows = pos_ptr + b * stride_pb + idx[:, None] * stride_pn
    o_rows = out_ptr + (b * K + offs_k[:, None]) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = k_ok[:, None] & (offs_d[None, :] < D)
        xv = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=m, other=0.0).to(ACC)
        pv = tl.load(p_rows + offs_d[None, :] * stride_pd, mask=m, other=0.0).to(ACC)
        tl.store(o_rows + offs_d[None, :], (xv + pv).to(out_ptr.dtype.element_ty), mask=m)
    if kb == 0:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            r = tl.load(ids_restore_ptr + b * N + offs_n, mask=n_ok, other=0)
            tl.store(mask_ptr + b * N + offs_n, (r >= K).to(tl.float32), mask=n_ok)


@triton.jit
def _scatter_bwd_kernel(
    grad_out_ptr,  # [B, K, D] any strides
    ids_restore_ptr,  # [B, N] int64, contiguous
    grad_x_ptr,  # [B, N, D] contiguous (written when WRITE_X)
    grad_pos_ptr,  # POS_MODE 1: [n_chunks, N, D] fp32/fp64 partial sums; POS_MODE 2: [B, N, D]; contiguous
    B,
    N,
    K,
    D,
    stride_gb,
    stride_gk,
    stride_gd,
    B_PER_PROG,  # samples handled by one program (grid axis 2 walks the batch in chunks)
    WRITE_X: tl.constexpr,
    POS_MODE: tl.constexpr,  # 0: no grad_pos, 1: pos broadcast (sum over batch), 2: per-sample pos
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 gradients
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (nb, db, chunk): for its samples b, grad[b, n] = grad_out[b, ids_restore[b, n]] if kept else 0.

    Written as a gather through ids_restore, every element of grad_x is stored exactly once (no
    zero-fill + scatter); with a broadcast pos the program also sums its samples in registers and
    stores one partial sum per chunk (reduced over chunks by the launcher: deterministic, no atomics).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2).to(tl.int64)
    b_start = chunk * B_PER_PROG
    n_ok = offs_n < N
    d_ok = offs_d < D
    tile_ok = n_ok[:, None] & d_ok[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    # Per-sample base pointers advance by one sample per iteration (64-bit pointer arithmetic).
    dst = offs_n[:, None] * D + offs_d[None, :]
    restore_row = ids_restore_ptr + b_start * N + offs_n
    grad_out_row = grad_out_ptr + b_start * stride_gb + offs_d[None, :] * stride_gd
    grad_x_row = grad_x_ptr + b_start * N * D + dst
    grad_pos_row = grad_pos_ptr + b_start * N * D + dst
    for i in range(0, B_PER_PROG):
        in_batch = b_start + i < B
        row_ok = tile_ok & in_batch
        r = tl.load(restore_row, mask=n_ok & in_batch, other=K)
        kept = (r < K)[:, None] & row_ok
        g = tl.load(grad_out_row + r[:, None] * stride_gk, mask=kept, other=0.0).to(ACC)
        if WRITE_X:
            tl.store(grad_x_row, g.to(grad_x_ptr.dtype.element_ty), mask=row_ok)
        if POS_MODE == 1:
            acc += g
        if POS_MODE == 2:
            tl.store(grad_pos_row, g.to(grad_pos_ptr.dtype.element_ty), mask=row_ok)
        restore_row += N
        grad_out_row += stride_gb
        grad_x_row += N * D
        grad_pos_row += N * D
    if POS_MODE == 1:
        tl.store(grad_pos_ptr + chunk * N * D + dst, acc, mask=tile_ok)


_FWD_BLOCK_K = 16
_BWD_BLOCK_N = 16
_BWD_SAMPLES_PER_PROG = 16


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


class _GatherAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, ids_keep, ids_restore):  # type: ignore[override]
        b, n, d = x.shape
        k = ids_keep.shape[1]
        out = torch.empty(b, k, d, device=x.device, dtype=torch.promote_types(x.dtype, pos.dtype))
        mask = torch.empty(b, n, device=x.device, dtype=torch.float32)
        stride_pb = 0 if pos.shape[0] == 1 else pos.stride(0)
        grid = (b, triton.cdiv(k, _FWD_BLOCK_K))
        _gather_add_fwd_kernel[grid](
            x, pos, ids_keep, ids_restore, out, mask, n, k, d,
            x.stride(0), x.stride(1), x.stride(2), stride_pb, pos.stride(1), pos.stride(2),
            ACC=_acc_dtype(out.dtype), BLOCK_K=_FWD_BLOCK_K, BLOCK_D=min(256, triton.next_power_of_2(d)),
            BLOCK_N=min(1024, triton.next_power_of_2(n)),
        )  # fmt: skip
        ctx.save_for_backward(ids_restore)
        ctx.shapes = (x.shape, x.dtype, pos.shape, pos.dtype, k)
        ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, grad_out, _grad_mask):  # type: ignore[override]
        (ids_restore,) = ctx.saved_tensors
        (b, n, d), x_dtype, pos_shape, pos_dtype, k = ctx.shapes
        need_x, need_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dev = grad_out.device
        grad_x = torch.empty(b, n, d, device=dev, dtype=x_dtype) if need_x else None
        grad_pos = torch.empty(pos_shape, device=dev, dtype=pos_dtype) if need_pos else None
        pos_mode = 0 if not need_pos else (1 if pos_shape[0] == 1 else 2)
        if not (need_x or need_pos):
            return None, None, None, None
        acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
        block_d = min(128, triton.next_power_of_2(d))
        chunks = triton.cdiv(b, _BWD_SAMPLES_PER_PROG)
        grid = (triton.cdiv(n, _BWD_BLOCK_N), triton.cdiv(d, block_d), chunks)
        pos_out = grad_pos
        if pos_mode == 1:  # per-chunk partial sums, reduced below
            pos_out = torch.empty(chunks, n, d, device=dev, dtype=acc_dtype)
        _scatter_bwd_kernel[grid](
            grad_out, ids_restore,
            grad_x if grad_x is not None else grad_out, pos_out if pos_out is not None else grad_out,
            b, n, k, d, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), _BWD_SAMPLES_PER_PROG,
            WRITE_X=need_x, POS_MODE=pos_mode, ACC=_acc_dtype(grad_out.dtype), BLOCK_N=_BWD_BLOCK_N, BLOCK_D=block_d,
        )  # fmt: skip
        if pos_mode == 1:
            grad_pos = pos_out.sum(0, keepdim=True).to(pos_dtype)
        return grad_x, grad_pos, None, None


def random_masking_triton(
    x: torch.Tensor, pos: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> Masked:
    """Fused Triton implementation (indices from the same torch noise as the reference)."""
    _validate(x, pos, ratio)
    b, n, _ = x.shape
    ids_keep, ids_restore, _k = shuffle_indices(b, n, ratio, generator, x.device)
    out, mask = _GatherAddFunction.apply(x, pos, ids_keep, ids_restore)
    return Masked(out, mask, ids_keep, ids_restore)


def random_masking(
    x: torch.Tensor,
    pos: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    *,
    impl: str = "auto",
) -> Masked:
    """Keep a random `K = int(N * (1 - ratio))` (>= 1) of the N tokens of each sample, with pos added.

    x [B, N, D], pos [1|B, N, D] -> Masked(x [B, K, D], mask [B, N], ids_keep [B, K], ids_restore [B, N]).
    Differentiable w.r.t. x and pos. `impl`: "auto" (Triton on CUDA, else reference), "triton",
    "reference"; both give identical indices/mask for the same generator state.
    """
    if resolve_impl(impl, x, pos, op="random_masking") == "triton":
        return random_masking_triton(x, pos, ratio, generator)
    return random_masking_reference(x, pos, ratio, generator)
