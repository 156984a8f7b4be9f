import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import parallel
from dsv3_jax.kernels import latent_attention as la


def reference(q_lat, q_pe, latent, k_pe, layer, slots, scale):
    """float64 NumPy: per query (b, t, h), softmax over slots s <= slots[b, t] of the layer's cache."""
    q_lat, q_pe, latent, k_pe = (np.asarray(a, np.float64) for a in (q_lat, q_pe, latent, k_pe))
    lat, kpe = latent[layer], k_pe[layer]  # [B,S,R], [B,S,Kr]
    s = (np.einsum("bthr,bsr->bths", q_lat, lat) + np.einsum("bthk,bsk->bths", q_pe, kpe)) * scale
    visible = np.arange(lat.shape[1])[None, None, None, :] <= np.asarray(slots)[:, :, None, None]
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bths,bsr->bthr", p / p.sum(-1, keepdims=True), lat)


def merged(out_lse):
    """The chunks weighed into one attention over all slots [B,T,H,R]."""
    return np.asarray(la.merge_chunks(*out_lse))


def chunk_reference(q_lat, q_pe, latent, k_pe, layer, slots, scale, chunk):
    """float64 NumPy, slots cut into chunks of `chunk`: each chunk's attention over its own
    visible slots and its log-sum-exp (zeros and -inf where a query sees none of it)."""
    q_lat, q_pe, latent, k_pe = (np.asarray(a, np.float64) for a in (q_lat, q_pe, latent, k_pe))
    lat, kpe = latent[layer], k_pe[layer]
    s = (np.einsum("bthr,bsr->bths", q_lat, lat) + np.einsum("bthk,bsk->bths", q_pe, kpe)) * scale
    visible = np.arange(lat.shape[1])[None, None, None, :] <= np.asarray(slots)[:, :, None, None]
    outs, lses = [], []
    for c0 in range(0, lat.shape[1], chunk):
        sc = np.where(visible[..., c0:c0 + chunk], s[..., c0:c0 + chunk], -np.inf)
        m = sc.max(-1, keepdims=True)
        p = np.exp(sc - np.where(np.isfinite(m), m, 0))
        den = p.sum(-1)
        outs.append(np.einsum("bths,bsr->bthr", p, lat[:, c0:c0 + chunk]) / np.maximum(den, 1e-300)[..., None])
        lses.append(np.where(den > 0, np.log(np.maximum(den, 1e-300)) + np.where(np.isfinite(m[..., 0]), m[..., 0], 0),
                             -np.inf))
    return np.stack(outs, 1), np.stack(lses, 1)


def problem(T, H, S=200, L=3, B=3, R=32, Kr=16, seed=0):
    rs = np.random.RandomState(seed)
    q_lat, q_pe = (jnp.asarray(rs.randn(B, T, H, d), jnp.float32) for d in (R, Kr))
    latent, k_pe = (jnp.asarray(rs.randn(L, B, S, d), jnp.float32) for d in (R, Kr))
    # a row that sees a few slots (later chunks see nothing), one that sees into the last
    # partial block, one in the middle
    slots = jnp.asarray(np.array([2, S - T, 97])[:B, None] + np.arange(T), jnp.int32)
    return q_lat, q_pe, latent, k_pe, jnp.int32(1), slots


@pytest.mark.parametrize("T,H", [(1, 4), (2, 36)])  # 4 query rows (padded to 16); 72 rows (two blocks of 64)
def test_kernel_and_xla_match_numpy(T, H):
    """The Pallas kernel (interpret mode) and the XLA form: slots past a query masked, cache
    read at the given layer, chunks of 64 slots merged; S = 200 is no multiple of the block."""
    args = problem(T, H)
    want = reference(*args, 0.3)
    xla = la.latent_attention(*args, 0.3, impl="xla")
    kernel = la._pallas(*args, 0.3, interpret=True)
    assert xla[0].shape[1] == 1 and kernel[0].shape[1] > 1  # one chunk; several
    np.testing.assert_allclose(merged(xla), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged(kernel), want, rtol=1e-5, atol=1e-6)


def test_kernel_chunks_and_their_log_sum_exp_match_numpy():
    """Each chunk on its own: normalised over its visible slots, with its log-sum-exp; a chunk a
    query sees nothing of is zeros with a log-sum-exp of about -1e30 (no weight in the merge)."""
    args = problem(1, 4)
    out, lse = la._pallas(*args, 0.3, interpret=True)
    chunk = -(-args[2].shape[2] // out.shape[1])
    want_out, want_lse = chunk_reference(*args, 0.3, chunk=-(-chunk // la.BLOCK_S) * la.BLOCK_S)
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-6)
    seen = np.isfinite(want_lse)
    assert not seen.all()  # row 0 (slot 2) sees nothing of the later chunks
    np.testing.assert_allclose(np.asarray(lse)[seen], want_lse[seen], rtol=1e-5)
    assert (np.asarray(lse)[~seen] < -1e29).all()


def test_kernel_in_bf16_stays_near_fp32():
    """bf16 operands (what decode runs): within bf16 rounding of the exact result."""
    args = problem(1, 16)
    want = reference(*args, 0.3)
    low = [a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in args]
    got = merged(la._pallas(*low, 0.3, interpret=True))
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_kernel_under_a_mesh(monkeypatch):
    """Rows over data x expert, heads over tensor: the kernel runs per device on its slice."""
    monkeypatch.setattr(la, "_pallas", functools.partial(la._pallas, interpret=True))
    q_lat, q_pe, latent, k_pe, layer, slots = problem(1, 4, B=4, seed=1)
    slots = jnp.asarray([[2], [150], [97], [199]], jnp.int32)
    want = reference(q_lat, q_pe, latent, k_pe, 1, slots, 0.3)
    with jax.set_mesh(parallel.make_mesh("data=2,expert=2,tensor=2")):
        f = jax.jit(lambda *a: la.latent_attention(*a, 0.3, impl="pallas"))
        got = f(q_lat, q_pe, latent, k_pe, layer, slots)
        assert "shard_map" in str(jax.make_jaxpr(f)(q_lat, q_pe, latent, k_pe, layer, slots))
    np.testing.assert_allclose(merged(got), want, rtol=1e-5, atol=1e-6)


def test_bad_impl_and_dims():
    args = problem(1, 4, R=24)
    with pytest.raises(ValueError, match="powers of two"):
        la.latent_attention(*args, 0.3, impl="pallas")
    with pytest.raises(ValueError, match="choose from"):
        la.latent_attention(*args, 0.3, impl="flash")
    assert la.default_impl(1, 24, 16) == "xla"


def test_kernel_reads_a_cache_stored_in_another_dtype():
    """A bf16 cache with fp32 queries: blocks are cast as they load (the stack is never converted whole)."""
    q_lat, q_pe, latent, k_pe, layer, slots = problem(1, 4)
    latent, k_pe = latent.astype(jnp.bfloat16), k_pe.astype(jnp.bfloat16)
    want = reference(q_lat, q_pe, latent.astype(jnp.float32), k_pe.astype(jnp.float32), 1, slots, 0.3)
    got = la._pallas(q_lat, q_pe, latent, k_pe, layer, slots, 0.3, interpret=True)
    assert got[0].dtype == jnp.float32
    np.testing.assert_allclose(merged(got), want, rtol=1e-5, atol=1e-6)
