"""masked_patch_mse: Triton kernel (CPU interpreter) vs the PyTorch reference, MAE semantics, gradients."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from cxrfast.kernels import _dispatch, masked_patch_mse, masked_patch_mse_reference, patchify  # noqa: E402

# Kernels run in Triton's CPU interpreter here, or compiled on CUDA with TRITON_INTERPRET=0.
DEVICE = "cpu" if _dispatch.interpreter_active() or not torch.cuda.is_available() else "cuda"
LOSS_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}
# bf16 gradients: one ulp (2^-8 relative); the interpreter's fp32 -> bf16 cast truncates.
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-6, rtol=1e-2)}


def _inputs(b: int, c: int, patch: int, grid_hw: tuple[int, int], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid_hw
    n = gh * gw
    pred = torch.randn(b, n, patch * patch * c, generator=g).to(dtype)
    # fp32 whatever pred's dtype: the trainer keeps loss targets fp32 under bf16 (DataRequest.fp32_outputs)
    target = torch.rand(b, c, gh * patch, gw * patch, generator=g) * 2 - 0.5
    mask = (torch.rand(b, n, generator=g) < 0.6).float()
    mask[:, 0] = 1.0  # at least one masked patch per sample
    return pred.to(DEVICE), target.to(DEVICE), mask.to(DEVICE)


def _loss_and_grad(impl: str, pred: torch.Tensor, target, mask, patch: int, norm_pix: bool):
    pred = pred.detach().clone().requires_grad_(True)
    loss = masked_patch_mse(pred, target, mask, patch, norm_pix, impl=impl)
    loss.backward()
    return loss.detach(), pred.grad


@pytest.mark.parametrize(
    ("b", "c", "patch", "grid_hw"),
    [
        (1, 1, 4, (3, 3)),  # batch 1, odd patch count, p*p*C = 16
        (2, 3, 2, (2, 3)),  # 3 channels, non-square grid, p*p*C = 12 (not a power of 2)
        (2, 1, 16, (1, 3)),  # MAE patch 16, 1 channel: 256 values per patch
        (1, 3, 16, (1, 2)),  # p*p*C = 768, not a power of 2
        (1, 1, 32, (1, 2)),  # MRM: 32x32 patches of the 448 target, 1024 values per patch
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_triton_matches_reference(b, c, patch, grid_hw, dtype, norm_pix) -> None:
    pred, target, mask = _inputs(b, c, patch, grid_hw, dtype)
    ref_loss, ref_grad = _loss_and_grad("reference", pred, target, mask, patch, norm_pix)
    tri_loss, tri_grad = _loss_and_grad("triton", pred, target, mask, patch, norm_pix)
    assert tri_loss.dtype == torch.float32 and tri_loss.shape == ()
    assert tri_grad.dtype == dtype and tri_grad.shape == pred.shape
    torch.testing.assert_close(tri_loss, ref_loss, **LOSS_TOL[dtype])
    torch.testing.assert_close(tri_grad, ref_grad, **GRAD_TOL[dtype])
    # Unmasked patches get no gradient.
    assert torch.all(tri_grad[mask == 0] == 0)


def test_strided_pred_and_target_bool_mask_and_grad_scale() -> None:
    """The decoder output without its cls token is a strided view; targets may be views too."""
    b, c, patch, n = 2, 1, 4, 4
    g = torch.Generator().manual_seed(1)
    full = torch.randn(b, n + 1, patch * patch * c, generator=g).to(DEVICE)
    target_big = torch.rand(b, c, 2 * patch + 3, 2 * patch + 5, generator=g).to(DEVICE)
    target = target_big[:, :, 1 : 2 * patch + 1, 2 : 2 * patch + 2]
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]], device=DEVICE)
    results = {}
    for impl in ("reference", "triton"):
        leaf = full.detach().clone().requires_grad_(True)
        pred = leaf[:, 1:, :]
        assert not pred.is_contiguous() and not target.is_contiguous()
        loss = masked_patch_mse(pred, target, mask, patch, impl=impl)
        (3.0 * loss).backward()
        results[impl] = (loss.detach(), leaf.grad)
    torch.testing.assert_close(results["triton"][0], results["reference"][0])
    torch.testing.assert_close(results["triton"][1], results["reference"][1])
    assert torch.all(results["triton"][1][:, 0] == 0)  # cls token row untouched
    float_mask = masked_patch_mse(full[:, 1:], target, mask.float(), patch, impl="triton")
    torch.testing.assert_close(float_mask, results["triton"][0])


def test_reference_is_mae_forward_loss() -> None:
    """Patch order (p, q, c) and the loss formula, spelled out independently of the module."""
    b, c, p, gh, gw = 2, 3, 2, 2, 3
    img = torch.arange(b * c * gh * p * gw * p, dtype=torch.float32).reshape(b, c, gh * p, gw * p)
    patches = patchify(img, p)
    assert patches.shape == (b, gh * gw, p * p * c)
    for n in range(gh * gw):
        h, w = divmod(n, gw)
        for pi in range(p):
            for qi in range(p):
                for ci in range(c):
                    assert patches[1, n, (pi * p + qi) * c + ci] == img[1, ci, h * p + pi, w * p + qi]
    pred = torch.randn(b, gh * gw, p * p * c)
    mask = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0]])
    t = patches
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=True, keepdim=True) + 1e-6) ** 0.5
    expected = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(masked_patch_mse_reference(pred, img, mask, p), expected)


def test_gradcheck_reference_float64() -> None:
    pred = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.float64)

    def fn(pred: torch.Tensor) -> torch.Tensor:
        t = patchify(target, 2)  # float64 all the way (the public op computes in fp32)
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()

    assert torch.autograd.gradcheck(fn, (pred,))
    # The analytic gradient the Triton backward implements, against autograd of the reference.
    loss = masked_patch_mse_reference(pred.float(), target.float(), mask.float(), 2)
    (grad,) = torch.autograd.grad(loss, pred)
    t = patchify(target, 2)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    analytic = 2 * (pred.detach() - t) / 12 * (mask / mask.sum())[..., None]
    torch.testing.assert_close(grad, analytic, atol=1e-5, rtol=1e-4)


def test_optimisation_converges_identically_with_kernel_on_and_off() -> None:
    """A few SGD steps on pred with the kernel and with the reference follow the same path."""
    pred0, target, mask = _inputs(1, 1, 4, (2, 2), torch.float32, seed=3)
    finals = {}
    for impl in ("reference", "triton"):
        pred = pred0.clone().requires_grad_(True)
        opt = torch.optim.SGD([pred], lr=2.0)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = masked_patch_mse(pred, target, mask, 4, impl=impl)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        finals[impl] = losses
    assert finals["triton"][-1] < 0.5 * finals["triton"][0]
    torch.testing.assert_close(torch.tensor(finals["triton"]), torch.tensor(finals["reference"]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("pred_shape", "target_shape", "mask_shape", "patch", "match"),
    [
        ((2, 4, 16), (2, 1, 8, 8), (2, 4), 3, "not divisible"),
        ((2, 5, 16), (2, 1, 8, 8), (2, 5), 4, "has 4 patches"),
        ((2, 4, 32), (2, 1, 8, 8), (2, 4), 4, "patch\\*patch\\*C"),
        ((2, 4, 16), (3, 1, 8, 8), (2, 4), 4, "batch"),
        ((2, 4, 16), (2, 1, 8, 8), (2, 5), 4, "mask must be"),
        ((2, 4), (2, 1, 8, 8), (2, 4), 4, "pred must be"),
        ((2, 4, 16), (2, 8, 8), (2, 4), 4, "target must be"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input_raises(pred_shape, target_shape, mask_shape, patch, match, impl) -> None:
    with pytest.raises(ValueError, match=match):
        masked_patch_mse(
            torch.zeros(pred_shape, device=DEVICE), torch.zeros(target_shape, device=DEVICE),
            torch.ones(mask_shape, device=DEVICE), patch, impl=impl,
        )  # fmt: skip


def test_norm_pix_needs_two_values_per_patch() -> None:
    with pytest.raises(ValueError, match="norm_pix"):
        masked_patch_mse(torch.zeros(1, 4, 1), torch.zeros(1, 1, 2, 2), torch.ones(1, 4), 1, norm_pix=True)
    loss = masked_patch_mse(torch.ones(1, 4, 1), torch.zeros(1, 1, 2, 2), torch.ones(1, 4), 1, norm_pix=False)
    assert loss.item() == 1.0
