import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import fp8, kernels, parallel
from dsv3_jax.kernels import scaled_matmul
from tests.test_fp8 import np_chunked_dot, np_fp8_linear, randn, rel


@pytest.fixture
def interpreted(monkeypatch):
    """The Pallas kernel in interpret mode (no GPU here)."""
    monkeypatch.setattr(scaled_matmul, "pallas", functools.partial(scaled_matmul.pallas, interpret=True))


@pytest.mark.parametrize("M,K,N", [(200, 384, 136), (256, 256, 128)], ids=["masked-edges", "whole-blocks"])
def test_kernel_matches_numpy_chunked_products(M, K, N):
    """M and N multiples of the 128 block (unmasked loads) or not (masked edges); K chunks with
    their own scales."""
    rs = np.random.RandomState(0)
    aq = jnp.asarray(rs.randn(M, K) * 40, jnp.float8_e4m3fn)
    bq = jnp.asarray(rs.randn(K, N) * 40, jnp.float8_e4m3fn)
    a_s, b_s = rs.uniform(0.5, 2, (M, K // 128)).astype(np.float32), rs.uniform(0.5, 2, (K // 128, N)).astype(
        np.float32)
    got = scaled_matmul.pallas(aq, jnp.asarray(a_s), bq, jnp.asarray(b_s), interpret=True)
    want = np_chunked_dot(np.asarray(aq.astype(jnp.float32)), a_s, np.asarray(bq.astype(jnp.float32)), b_s)
    assert rel(got, want) < 1e-6


def test_native_fp8_linear_with_the_kernel_matches_numpy_recipe(interpreted):
    """All three GEMMs of the FP8 linear (forward, dgrad, wgrad with 128x1 re-tiling) through the
    kernel equal the NumPy recipe; the kernel is really in the program."""
    x, w, g = randn(3, (200, 300)), randn(4, (300, 160), 0.05), randn(5, (200, 160))
    f = lambda x, w: fp8.matmul(x, w, fp8.Recipe(native=True), jnp.float32)  # noqa: E731
    with kernels.use(scaled_matmul="pallas"):
        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
        dx, dw = vjp(jnp.asarray(g))
        jaxpr = str(jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[1](jnp.asarray(g)))(jnp.asarray(x), jnp.asarray(w)))
    assert jaxpr.count("pallas_call") == 3
    for got, want in zip((y, dx, dw), np_fp8_linear(x, w, g), strict=True):
        assert rel(got, want) < 1e-6


def test_default_by_backend_and_k_must_be_whole_chunks(monkeypatch):
    assert scaled_matmul.default_impl() == "xla"
    with kernels.use(scaled_matmul="pallas"):
        assert scaled_matmul.default_impl() == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert scaled_matmul.default_impl() == "pallas"
    with jax.set_mesh(parallel.make_mesh("data=-1")):  # more than one device: a dot the partitioner splits
        assert scaled_matmul.default_impl() == "xla"
    with kernels.use(scaled_matmul="xla"):
        assert scaled_matmul.default_impl() == "xla"
    monkeypatch.undo()
    q = jnp.zeros((4, 100), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="K=100 must be a multiple of 128"):
        scaled_matmul.pallas(q, jnp.ones((4, 1)), q.T, jnp.ones((1, 4)), interpret=True)
