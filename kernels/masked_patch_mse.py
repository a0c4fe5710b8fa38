"""MAE reconstruction loss: patchify the target on the fly, optional norm-pix, MSE over masked patches.

`masked_patch_mse(pred, target, mask, patch, norm_pix, eps)` with pred `[B, N, p*p*C]`, target
`[B, C, H, W]` (H/p * W/p = N), mask `[B, N]`:

    t = patchify(target)                      # MAE order (p, q, c): einsum('nchpwq->nhwpqc')
    t = (t - mean) / sqrt(var + eps)          # per patch, var unbiased (torch.var), if norm_pix
    loss = sum(mean((pred - t)**2, -1) * mask) / sum(mask)

A mask that sums to 0 gives NaN, as in MAE. The result is a float32 scalar; `pred` may be fp32,
bf16 or fp16 (the kernels accumulate in fp32); the gradient flows to `pred` only.

The Triton kernels run one program per patch: it loads that patch's p*p*C target pixels with
strided loads straight from the image (no `[B, N, p*p*C]` patch tensor is ever materialised),
reduces mean/var in registers and writes one per-patch error; the backward recomputes the
normalised target (cheaper than storing it) and writes `grad_pred` directly. MRM's decoder
predicts 32x32 patches of a 448 target: p*p*C = 1024; non-power-of-2 sizes (e.g. 3x16x16 = 768)
are handled by masked `tl.arange` blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import resolve_impl


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C] in MAE's order (row-major patches, (p, q, c) inside)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _validate(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool, eps: float) -> None:
    op = "masked_patch_mse"
    if pred.dim() != 3 or not pred.is_floating_point():
        raise ValueError(f"{op}: pred must be a float [B, N, p*p*C] tensor, got {pred.dtype} {tuple(pred.shape)}")
    if target.dim() != 4 or not target.is_floating_point():
        raise ValueError(f"{op}: target must be a float [B, C, H, W] image, got {target.dtype} {tuple(target.shape)}")
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"{op}: patch must be a positive int, got {patch!r}")
    b, n, psize = pred.shape
    tb, c, h, w = target.shape
    if tb != b:
        raise ValueError(f"{op}: pred has batch {b} but target has batch {tb}")
    if b == 0 or n == 0:
        raise ValueError(f"{op}: empty pred of shape {tuple(pred.shape)}")
    if h % patch or w % patch:
        raise ValueError(f"{op}: target {h}x{w} is not divisible by patch {patch}")
    if (h // patch) * (w // patch) != n:
        raise ValueError(f"{op}: target {h}x{w} with patch {patch} has {(h // patch) * (w // patch)} patches, pred has {n}")
    if psize != patch * patch * c:
        raise ValueError(f"{op}: pred last dim {psize} != patch*patch*C = {patch}*{patch}*{c} = {patch * patch * c}")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"{op}: mask must be [B, N] = [{b}, {n}], got {tuple(mask.shape)}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise ValueError(f"{op}: mask must be float or bool, got {mask.dtype}")
    if norm_pix and psize < 2:
        raise ValueError(f"{op}: norm_pix needs at least 2 values per patch (unbiased var), got {psize}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps!r}")


def masked_patch_mse_reference(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Plain PyTorch, the single source of truth (MAE `forward_loss`, computed in fp32)."""
    _validate(pred, target, mask, patch, norm_pix, eps)
    t = patchify(target.float(), patch)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + eps) ** 0.5
    per_patch = ((pred.float() - t) ** 2).mean(dim=-1)
    m = mask.float()
    return (per_patch * m).sum() / m.sum()


# --------------------------------------------------------------------------------------- Triton


@triton.jit
def _patch_mse_kernel(
    pred_ptr,  # [B, N, P] any strides, P = PATCH*PATCH*C
    target_ptr,  # [B, C, H, W] any strides
    loss_ptr,  # [B*N] float32 per-patch mean squared error (forward)
    grad_ptr,  # [B, N, P] contiguous, dtype of pred (backward)
    mask_ptr,  # [B*N] float32 (backward)
    msum_ptr,  # [1] float32 sum(mask) (backward)
    grad_out_ptr,  # [1] float32 upstream gradient (backward)
    N,
    patches_w,
    stride_pb,
    stride_pn,
    stride_pp,
    stride_tb,
    stride_tc,
    stride_th,
    stride_tw,
    eps,
    PATCH: tl.constexpr,
    C: tl.constexpr,
    P: tl.constexpr,  # PATCH * PATCH * C
    NORM: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program per patch (b, n); forward writes loss[b*N+n], backward writes grad[b, n, :]."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    n = pid % N
    row0 = (n // patches_w) * PATCH
    col0 = (n % patches_w) * PATCH
    j = tl.arange(0, BLOCK_P)
    ok = j < P
    # element j of a patch is (p, q, c) = (j // (PATCH*C), (j // C) % PATCH, j % C)
    pi = j // (PATCH * C)
    qi = (j // C) % PATCH
    ci = j % C
    t_ptrs = target_ptr + b * stride_tb + ci * stride_tc + (row0 + pi) * stride_th + (col0 + qi) * stride_tw
    t = tl.load(t_ptrs, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(t, axis=0) / P
        dev = tl.where(ok, t - mean, 0.0)
        var = tl.sum(dev * dev, axis=0) / (P - 1)
        t = dev / tl.sqrt(var + eps)
    pr = tl.load(pred_ptr + b * stride_pb + n * stride_pn + j * stride_pp, mask=ok, other=0.0).to(tl.float32)
    diff = tl.where(ok, pr - t, 0.0)
    if BACKWARD:
        scale = tl.load(grad_out_ptr) * tl.load(mask_ptr + pid) / tl.load(msum_ptr) * (2.0 / P)
        tl.store(grad_ptr + pid * P + j, (diff * scale).to(grad_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(loss_ptr + pid, tl.sum(diff * diff, axis=0) / P)


def _launch(pred, target, patch, norm_pix, eps, *, loss=None, grad=None, mask=None, msum=None, grad_out=None):
    b, n, psize = pred.shape
    c = target.shape[1]
    backward = grad is not None
    dummy = pred  # never dereferenced: the unused pointers sit behind a constexpr branch
    _patch_mse_kernel[(b * n,)](
        pred, target, dummy if backward else loss, grad if backward else dummy,
        mask if backward else dummy, msum if backward else dummy, grad_out if backward else dummy,
        n, target.shape[3] // patch,
        pred.stride(0), pred.stride(1), pred.stride(2),
        target.stride(0), target.stride(1), target.stride(2), target.stride(3),
        float(eps), PATCH=patch, C=c, P=psize, NORM=bool(norm_pix), BACKWARD=backward,
        BLOCK_P=triton.next_power_of_2(psize),
    )  # fmt: skip


class _MaskedPatchMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, mask, patch, norm_pix, eps):  # type: ignore[override]
        b, n, _ = pred.shape
        m = mask.to(torch.float32).contiguous()
        msum = m.sum()
        per_patch = torch.empty(b * n, device=pred.device, dtype=torch.float32)
        _launch(pred, target, patch, norm_pix, eps, loss=per_patch)
        ctx.save_for_backward(pred, target, m, msum)
        ctx.cfg = (patch, norm_pix, eps)
        return (per_patch.view(b, n) * m).sum() / msum

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        pred, target, m, msum = ctx.saved_tensors
        patch, norm_pix, eps = ctx.cfg
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
            g = grad_out.to(torch.float32).reshape(1).contiguous()
            _launch(pred, target, patch, norm_pix, eps, grad=grad, mask=m, msum=msum.reshape(1), grad_out=g)
        return grad, None, None, None, None, None


def masked_patch_mse_triton(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Fused Triton implementation (patchify + norm-pix + masked MSE, forward and grad w.r.t. pred)."""
    _validate(pred, target, mask, patch, norm_pix, eps)
    return _MaskedPatchMSEFunction.apply(pred, target, mask, patch, norm_pix, eps)


def masked_patch_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """MSE of pred [B, N, p*p*C] against patchified target [B, C, H, W] over patches with mask [B, N] = 1.

    Returns a float32 scalar; differentiable w.r.t. pred. `impl`: "auto" (Triton on CUDA, else
    reference), "triton", "reference".
    """
    if resolve_impl(impl, pred, target, mask, op="masked_patch_mse") == "triton":
        return masked_patch_mse_triton(pred, target, mask, patch, norm_pix, eps)
    return masked_patch_mse_reference(pred, target, mask, patch, norm_pix, eps)
