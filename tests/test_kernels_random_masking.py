"""random_masking: Triton kernel (CPU interpreter) vs the PyTorch reference, statistics, gradients."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from cxrfast.kernels import (  # noqa: E402
    Masked,
    _dispatch,  # noqa: E402
    keep_count,
    random_masking,
    random_masking_reference,
)

# Kernels run in Triton's CPU interpreter here, or compiled on CUDA with TRITON_INTERPRET=0.
DEVICE = "cpu" if _dispatch.interpreter_active() or not torch.cuda.is_available() else "cuda"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# bf16: one ulp is 2^-8 relative (values here are O(1..10)).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def _run(impl: str, x: torch.Tensor, pos: torch.Tensor, ratio: float, seed: int = 0):
    x = x.detach().to(DEVICE).requires_grad_(True)
    pos = pos.detach().to(DEVICE).requires_grad_(True)
    out = random_masking(x, pos, ratio, _gen(seed), impl=impl)
    weights = torch.randn(out.x.shape, generator=torch.Generator().manual_seed(99)).to(DEVICE, out.x.dtype)
    (out.x * weights).float().sum().backward()
    return out, x.grad, pos.grad


@pytest.mark.parametrize(
    ("shape", "ratio"),
    [((1, 7, 5), 0.75), ((3, 49, 24), 0.9), ((2, 13, 33), 0.5), ((2, 10, 8), 0.0), ((2, 10, 8), 0.99),
     ((37, 5, 3), 0.6)],  # 37 samples: several batch chunks in the backward
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos_batch", ["broadcast", "per_sample"])
def test_triton_matches_reference(shape, ratio, dtype, pos_batch) -> None:
    b, n, d = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, d, generator=g).to(dtype)
    pos = torch.randn(1 if pos_batch == "broadcast" else b, n, d, generator=g).to(dtype)
    ref, ref_gx, ref_gp = _run("reference", x, pos, ratio)
    tri, tri_gx, tri_gp = _run("triton", x, pos, ratio)
    k = keep_count(n, ratio)
    assert tri.x.shape == (b, k, d) and tri.x.dtype == dtype
    # Indices and mask come from the same noise: identical.
    for name in ("mask", "ids_keep", "ids_restore"):
        assert torch.equal(getattr(tri, name), getattr(ref, name)), name
    # The add is exact in fp32; bf16 outputs may differ by one ulp under the interpreter, whose
    # fp32 -> bf16 cast truncates (compiled Triton rounds to nearest even, as torch does).
    torch.testing.assert_close(tri.x, ref.x, **TOL[dtype])
    torch.testing.assert_close(tri_gx, ref_gx, **TOL[dtype])
    torch.testing.assert_close(tri_gp, ref_gp, **TOL[dtype])
    assert tri_gx.dtype == dtype and tri_gp.shape == pos.shape


def test_mixed_dtypes_and_strided_inputs() -> None:
    """bf16 tokens + fp32 pos (autocast MAE) promote to fp32; non-contiguous x is read by strides."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 3, 2, generator=g).to(torch.bfloat16).transpose(0, 1)  # [3, 9, 2], strided
    pos = torch.randn(1, 9, 2, generator=g)
    assert not x.is_contiguous()
    ref, ref_gx, ref_gp = _run("reference", x, pos, 0.6)
    tri, tri_gx, tri_gp = _run("triton", x, pos, 0.6)
    assert tri.x.dtype == torch.float32 and torch.equal(tri.x, ref.x)
    assert tri_gx.dtype == torch.bfloat16
    torch.testing.assert_close(tri_gx, ref_gx, **TOL[torch.bfloat16])
    torch.testing.assert_close(tri_gp, ref_gp, **TOL[torch.float32])


@pytest.mark.parametrize(("x_grad", "pos_grad"), [(True, False), (False, True)])
def test_gradient_to_one_input_only(x_grad: bool, pos_grad: bool) -> None:
    """MAE's fixed sin-cos pos_embed has requires_grad=False; a frozen patch embed gives x none."""
    g = torch.Generator().manual_seed(4)
    x0, pos0 = torch.randn(2, 11, 6, generator=g).to(DEVICE), torch.randn(1, 11, 6, generator=g).to(DEVICE)
    grads = {}
    for impl in ("reference", "triton"):
        x, pos = x0.clone().requires_grad_(x_grad), pos0.clone().requires_grad_(pos_grad)
        out = random_masking(x, pos, 0.75, _gen(0), impl=impl)
        out.x.pow(2).sum().backward()
        assert (x.grad is None) != x_grad and (pos.grad is None) != pos_grad
        grads[impl] = x.grad if x_grad else pos.grad
    torch.testing.assert_close(grads["triton"], grads["reference"], **TOL[torch.float32])


def test_masking_semantics_and_exact_counts() -> None:
    b, n, d = 4, 49, 3
    x = torch.randn(b, n, d)
    pos = torch.randn(1, n, d)
    for ratio, k in ((0.75, 12), (0.9, 4), (0.0, 49), (0.999, 1)):
        out = random_masking_reference(x, pos, ratio, torch.Generator().manual_seed(3))
        assert isinstance(out, Masked)
        assert out.ids_keep.shape == (b, k) and out.ids_keep.dtype == torch.int64
        assert out.mask.dtype == torch.float32
        assert torch.equal(out.mask.sum(1), torch.full((b,), float(n - k)))
        for i in range(b):
            keep = out.ids_keep[i]
            assert len(set(keep.tolist())) == k
            assert torch.all(out.mask[i, keep] == 0)
            # ids_restore is the inverse of the shuffle: kept patch j sits at shuffled position j.
            assert torch.equal(out.ids_restore[i, keep], torch.arange(k))
            assert torch.equal(torch.sort(out.ids_restore[i]).values, torch.arange(n))
            torch.testing.assert_close(out.x[i], (x + pos)[i, keep])


def test_keep_count_edges() -> None:
    assert keep_count(196, 0.75) == 49
    assert keep_count(196, 0.9) == 19
    assert keep_count(10, 0.0) == 10
    assert keep_count(10, 0.99) == 1
    assert keep_count(1, 0.5) == 1


def test_every_position_equally_likely() -> None:
    """Keep frequency per position over 4000 draws: chi-square (9 dof) far below a p=1e-4 bound."""
    draws, n, ratio = 4000, 10, 0.7
    out = random_masking_reference(torch.zeros(draws, n, 1), torch.zeros(1, n, 1), ratio, torch.Generator().manual_seed(5))
    counts = (1 - out.mask).sum(0)
    expected = draws * keep_count(n, ratio) / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 33.7, (chi2, counts)
    # Different generator states give different masks; the same state the same mask.
    again = random_masking_reference(torch.zeros(draws, n, 1), torch.zeros(1, n, 1), ratio, torch.Generator().manual_seed(5))
    other = random_masking_reference(torch.zeros(draws, n, 1), torch.zeros(1, n, 1), ratio, torch.Generator().manual_seed(6))
    assert torch.equal(out.mask, again.mask) and not torch.equal(out.mask, other.mask)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_gradcheck_float64(impl: str) -> None:
    x = torch.randn(2, 6, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 6, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def fn(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return random_masking(x, pos, 0.5, _gen(7), impl=impl).x

    assert torch.autograd.gradcheck(fn, (x, pos))


def test_auto_is_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" never needs Triton on CPU; "triton" on CPU without the interpreter is a clear error."""
    monkeypatch.setattr(_dispatch, "interpreter_active", lambda: False)
    x, pos = torch.randn(2, 5, 4), torch.randn(1, 5, 4)
    out = random_masking(x, pos, 0.4, torch.Generator().manual_seed(0))
    ref = random_masking_reference(x, pos, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(out.x, ref.x)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        random_masking(x, pos, 0.4, impl="triton")


@pytest.mark.parametrize(
    ("x_shape", "pos_shape", "ratio", "dtype", "match"),
    [
        ((2, 5, 4), (1, 5, 4), 1.0, torch.float32, "ratio"),
        ((2, 5, 4), (1, 5, 4), -0.1, torch.float32, "ratio"),
        ((2, 5, 4), (3, 5, 4), 0.5, torch.float32, "pos must be"),
        ((2, 5, 4), (1, 6, 4), 0.5, torch.float32, "pos must be"),
        ((2, 5), (1, 5), 0.5, torch.float32, "x must be"),
        ((2, 5, 4), (1, 5, 4), 0.5, torch.int64, "floating point"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input_raises(x_shape, pos_shape, ratio, dtype, match, impl) -> None:
    with pytest.raises(ValueError, match=match):
        random_masking(
            torch.zeros(x_shape, dtype=dtype, device=DEVICE), torch.zeros(pos_shape, dtype=dtype, device=DEVICE), ratio, impl=impl
        )


def test_unknown_impl_raises() -> None:
    with pytest.raises(ValueError, match="impl must be one of"):
        random_masking(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), 0.5, impl="cuda")
