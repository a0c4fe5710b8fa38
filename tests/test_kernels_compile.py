"""The Triton kernels compile for the GPU (sm_80 / sm_90 cubin via Triton's bundled ptxas), no GPU needed.

The interpreter tests check the numerics; this catches what only the compiler rejects (types of
loop-carried values, constexpr use, pointer arithmetic). It runs in a subprocess because this test
session imported Triton in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import importlib
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rm, mp, ml = (importlib.import_module(f"cxrfast.kernels.{m}")
                  for m in ("random_masking", "masked_patch_mse", "mlm_masking"))
    I = "i32"

    def compile_(fn, sig, consts, arch):
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
        assert kernel.asm["cubin"], fn.__name__

    for arch in (80, 90):
        for x_t, acc in (("*bf16", tl.float32), ("*fp64", tl.float64)):
            sig = dict(x_ptr=x_t, pos_ptr="*fp32", ids_keep_ptr="*i64", ids_restore_ptr="*i64", out_ptr="*fp32",
                       mask_ptr="*fp32", N=I, K=I, D=I, stride_xb=I, stride_xn=I, stride_xd=I, stride_pb=I,
                       stride_pn=I, stride_pd=I, ACC="constexpr", BLOCK_K="constexpr", BLOCK_D="constexpr",
                       BLOCK_N="constexpr")
            compile_(rm._gather_add_fwd_kernel, sig, dict(ACC=acc, BLOCK_K=16, BLOCK_D=256, BLOCK_N=256), arch)
            for mode in (0, 1, 2):
                sig = dict(grad_out_ptr="*fp32", ids_restore_ptr="*i64", grad_x_ptr=x_t, grad_pos_ptr="*fp32",
                           B=I, N=I, K=I, D=I, stride_gb=I, stride_gk=I, stride_gd=I, B_PER_PROG=I,
                           WRITE_X="constexpr",
                           POS_MODE="constexpr", ACC="constexpr", BLOCK_N="constexpr", BLOCK_D="constexpr")
                consts = dict(WRITE_X=mode != 2, POS_MODE=mode, ACC=acc, BLOCK_N=16, BLOCK_D=128)
                compile_(rm._scatter_bwd_kernel, sig, consts, arch)
        for pred_t in ("*bf16", "*fp32"):
            for patch, c in ((16, 1), (32, 1), (16, 3)):
                for backward in (False, True):
                    sig = dict(pred_ptr=pred_t, target_ptr="*fp32", loss_ptr="*fp32", grad_ptr=pred_t,
                               mask_ptr="*fp32", msum_ptr="*fp32", grad_out_ptr="*fp32", N=I, patches_w=I,
                               stride_pb=I, stride_pn=I, stride_pp=I, stride_tb=I, stride_tc=I, stride_th=I,
                               stride_tw=I, eps="fp32", PATCH="constexpr", C="constexpr", P="constexpr",
                               NORM="constexpr", BACKWARD="constexpr", BLOCK_P="constexpr")
                    p = patch * patch * c
                    consts = dict(PATCH=patch, C=c, P=p, NORM=backward, BACKWARD=backward,
                                  BLOCK_P=triton.next_power_of_2(p))
                    compile_(mp._patch_mse_kernel, sig, consts, arch)
        sig = dict(ids_ptr="*i64", word_start_ptr="*u8", special_ptr="*i64", u_word_ptr="*fp32",
                   u_replace_ptr="*fp32", ranks_ptr="*i64", out_ptr="*i64", labels_ptr="*i64", L=I, S=I,
                   prob="fp32", p_mask="fp32", p_mask_or_random="fp32", mask_id=I, BLOCK_L="constexpr")
        compile_(ml._mask_tokens_kernel, sig, dict(BLOCK_L=128), arch)
    print("compiled all")
    """
)


def test_kernels_compile_for_gpu(tmp_path: Path) -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled all" in proc.stdout, proc.stderr[-4000:]
