import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from dsv3_jax.model.layers import Linear, RMSNorm, SwiGLU, broadcast_new_axis, einsum, lookup, matmul_f32
from tests.hf_reference import t2n


def test_rmsnorm_matches_hf_fp32_and_bf16():
    ref = hf.DeepseekV3RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 48))
    x = np.random.RandomState(0).randn(3, 5, 48).astype(np.float32) * 3
    ours = RMSNorm(48, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
    ours.scale[...] = jnp.asarray(t2n(ref.weight))
    np.testing.assert_allclose(ours(jnp.asarray(x)), t2n(ref(torch.tensor(x))), rtol=1e-6, atol=1e-6)
    # bf16: HF rounds the normalised value to bf16 before the bf16 weight multiply; so do we.
    ref_bf16 = ref.to(torch.bfloat16)
    ours_bf16 = RMSNorm(48, eps=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ours_bf16.scale[...] = jnp.asarray(t2n(ref.weight))
    xb = torch.tensor(x).to(torch.bfloat16)
    got = ours_bf16(jnp.asarray(t2n(xb)).astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), t2n(ref_bf16(xb)))


def test_rmsnorm_scale_gradient_sums_in_fp32():
    """bf16 norm over 4,096 tokens: the scale's gradient is the float64 sum of the output gradient
    times the rounded normalised value (the output itself at a unit scale) to fp32 accuracy
    (autodiff summed it in bf16, ~1e-2 off); the input's gradient is HF's to a bf16 ulp."""
    rs = np.random.RandomState(3)
    x, g = rs.randn(4096, 64).astype(np.float32), rs.randn(4096, 64).astype(np.float32)
    norm = RMSNorm(64, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32)  # unit scale
    graphdef, state = nnx.split(norm)
    y, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.asarray(x, jnp.bfloat16))
    d_state, dx = vjp(jnp.asarray(g, jnp.bfloat16))
    g64 = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
    want = (g64 * np.asarray(y, np.float64)).sum(0)
    np.testing.assert_allclose(np.asarray(d_state["scale"][...]), want, rtol=0, atol=1e-5 * np.abs(want).max())
    ref = hf.DeepseekV3RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    xt = torch.tensor(x).to(torch.bfloat16).requires_grad_()
    ref(xt).backward(torch.tensor(g).to(torch.bfloat16))
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), t2n(xt.grad), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("copies", [16, 128])
def test_broadcast_gradient_sums_the_copies_in_fp32(copies):
    """A rope key copied to every head: its gradient is the heads' bf16 cotangents summed once
    (torch's expand: the float64 sum rounded to bf16, up to one ulp where fp32 and float64 round
    apart); autodiff's bf16 sum was ~0.4-0.7% off, outside that on 64-77% of the entries."""
    g = jnp.asarray(np.random.RandomState(copies).randn(2, 512, copies, 64), jnp.bfloat16)
    k_pe = jnp.asarray(np.random.RandomState(0).randn(2, 512, 64), jnp.bfloat16)
    y, vjp = jax.vjp(lambda k: broadcast_new_axis(k, (2, 512, copies, 64), 2), k_pe)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(k_pe)[:, :, None], y.shape))
    (got,) = vjp(g)
    want = np.asarray(jnp.asarray(np.asarray(g, np.float64).sum(2), jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8, atol=0)


def test_linear_is_x_times_kernel_in_out_layout():
    lin = Linear(6, 4, std=1.0, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    x = np.random.RandomState(1).randn(2, 6).astype(np.float32)
    np.testing.assert_allclose(lin(jnp.asarray(x)), x @ np.asarray(lin.kernel[...]), rtol=1e-6)
    assert lin.kernel.shape == (6, 4)


def test_einsum_bf16_accumulates_in_fp32_and_rounds_once():
    rs = np.random.RandomState(2)
    x, w = rs.randn(4, 512).astype(np.float32), rs.randn(512, 3).astype(np.float32)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    exact = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)
    got = einsum("ti,io->to", xb, wb, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16)))


def test_einsum_bf16_gradient_runs_bf16_gemms_and_returns_fp32_weight_grad():
    rs = np.random.RandomState(3)
    xb = jnp.asarray(rs.randn(4, 5, 64), jnp.bfloat16)
    w = jnp.asarray(rs.randn(64, 6), jnp.float32)  # fp32 master weight
    c = jnp.asarray(rs.randn(4, 5, 6), jnp.bfloat16)  # the cotangent, exactly representable in bf16

    def f(x, w):
        return (einsum("...d,df->...f", x, w, dtype=jnp.bfloat16).astype(jnp.float32) * c.astype(jnp.float32)).sum()

    dx, dw = jax.grad(f, (0, 1))(xb, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    x64, w64, c64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (xb, w.astype(jnp.bfloat16), c))
    # dX: bf16 operands, fp32 accumulation, rounded once to bf16; dW stays fp32
    want_dx = jnp.asarray(np.einsum("btf,df->btd", c64, w64), jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(want_dx))
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btd,btf->df", x64, c64), rtol=1e-6, atol=1e-5)
    hlo = jax.jit(jax.grad(f, (0, 1))).lower(xb, w).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 2 and all(re.search(r"\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\)", d) for d in dots), dots


def _fp32_sum_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The worst-case error of a @ b summed in fp32 from exact products, elementwise: gamma_n
    times |a| @ |b| (n = the terms, plus the two adds that join three pieces). The order of the
    sum is the backend's (it differs between CPUs), so no tighter bound holds everywhere."""
    n = a.shape[-1] + 2
    return n * 2.0 ** -24 / (1 - n * 2.0 ** -24) * (np.abs(a) @ np.abs(b))


def test_matmul_f32_of_bf16_activations_is_fp32_exact_with_fp32_weight_grad():
    """Against float64: the product and the weight gradient to fp32 accumulation, the input
    gradient to its bf16 rounding; the fp32 input takes a plain full-precision dot."""
    rs = np.random.RandomState(4)
    xb = jnp.asarray(rs.randn(96, 256), jnp.bfloat16)
    w = jnp.asarray(rs.randn(256, 16) * 0.02, jnp.float32)  # not representable in bf16
    g = jnp.asarray(rs.randn(96, 16), jnp.float32)
    x64, w64, g64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (xb, w, g))
    y, vjp = jax.vjp(matmul_f32, xb, w)
    dx, dw = vjp(g)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    assert np.all(np.abs(np.asarray(y) - x64 @ w64) <= _fp32_sum_bound(x64, w64))
    assert np.all(np.abs(np.asarray(dw) - x64.T @ g64) <= _fp32_sum_bound(x64.T, g64))
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), g64 @ w64.T, rtol=2 ** -8, atol=1e-6)
    assert np.abs(np.asarray(jnp.asarray(xb @ w.astype(jnp.bfloat16), jnp.float32)) - x64 @ w64).max() > 1e3 * np.abs(
        np.asarray(y) - x64 @ w64).max()  # a bf16 weight would be ~1000x further off
    y32 = matmul_f32(xb.astype(jnp.float32), w)
    np.testing.assert_allclose(np.asarray(y32), x64 @ w64, rtol=1e-5, atol=1e-6)


def test_swiglu_matches_hf_mlp():
    class Cfg:
        hidden_size, intermediate_size, hidden_act = 16, 24, "silu"

    torch.manual_seed(0)
    ref = hf.DeepseekV3MLP(Cfg())
    ours = SwiGLU(16, 24, std=1.0, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(ours, name).kernel[...] = jnp.asarray(t2n(getattr(ref, name).weight).T)
    x = np.random.RandomState(3).randn(2, 7, 16).astype(np.float32)
    np.testing.assert_allclose(ours(jnp.asarray(x)), t2n(ref(torch.tensor(x))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_embedding_gradient_sums_each_token_in_fp32(dtype):
    """A 4,096-token batch over a 50-token vocabulary (frequent tokens repeat ~80 times): each
    row of the table's gradient is the float64 sum of its token's cotangents rounded once to the
    table's dtype (within one ulp and fp32's summation error); rows of absent tokens are zero."""
    rs = np.random.RandomState(0)
    V, D = 64, 32
    tokens = rs.randint(0, 50, size=(4, 1024))
    table = jnp.asarray(rs.randn(V, D), dtype)
    g = jnp.asarray(rs.randn(4, 1024, D), dtype)
    y, vjp = jax.vjp(lambda t: lookup(t, jnp.asarray(tokens)), table)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(table)[tokens])
    (got,) = vjp(g)
    want, size = np.zeros((V, D)), np.zeros((V, D))
    np.add.at(want, tokens.reshape(-1), np.asarray(g, np.float64).reshape(-1, D))
    np.add.at(size, tokens.reshape(-1), np.abs(np.asarray(g, np.float64)).reshape(-1, D))
    fp32_error = np.bincount(tokens.reshape(-1), minlength=V)[:, None] * 2.0**-24 * size
    assert got.dtype == dtype
    want_rounded = np.asarray(jnp.asarray(want, dtype), np.float64)
    ulp = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-22
    assert (np.abs(np.asarray(got, np.float64) - want_rounded) <= ulp * np.abs(want_rounded) + fp32_error).all()
    assert not np.asarray(got)[50:].any()
