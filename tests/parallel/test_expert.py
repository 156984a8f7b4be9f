"""Expert-parallel routed experts equal the local ones, on both transports, balanced or skewed.

The reference is `routed_experts` outside any mesh (the single-device path the model tests pin
to HF). The ragged transport runs only where the backend implements ragged_all_to_all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.parallel import choose_transport, expert_transport, make_mesh, routed_experts
from dsv3_jax.parallel.expert import RAGGED_PLATFORMS

E, D, F, K = 16, 8, 6, 3
DEVICES = len(jax.devices())
TRANSPORTS = ["dense", "gather"] + (["ragged"] if jax.default_backend() in RAGGED_PLATFORMS else [])


def _problem(n: int, skew: bool):
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (n, D))
    logits = jax.random.normal(ks[1], (n, E)) + (jnp.arange(E) < K) * 100.0 * skew  # skew: all to experts 0..K-1
    weights, ids = jax.lax.top_k(jax.nn.sigmoid(logits), K)
    gate_up = jnp.stack([jax.random.normal(k, (E, D, F)) for k in ks[2:4]], axis=2) / np.sqrt(D)  # [E,D,2,F]
    down = jax.random.normal(ks[4], (E, F, D)) / np.sqrt(F)
    return x, weights, ids.astype(jnp.int32), gate_up, down


def _loss(*args):
    y = routed_experts(*args, dtype=jnp.float32)
    return (y * jnp.cos(y)).sum(), y


def _grad():  # a fresh jit per use: the transport is chosen when the function is traced
    return jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 3, 4), has_aux=True))

MESHES = [f"expert={DEVICES}", "data=2,expert=-1", "fsdp=2,expert=2,tensor=-1"][:3 if DEVICES >= 8 else 2]
# (mesh, transport, capacity factor): every transport on every mesh with room for any routing, and
# the capacity branches (no factor for ragged) at expert=8, where both branches are taken
CASES = ([(m, t, 0.0) for m in MESHES for t in TRANSPORTS]
         + [(MESHES[0], t, 1.25) for t in ("dense", "gather")])


def test_capacity_fits_balanced_routing_and_not_skewed():
    """The two branches of the dense and gather transports are both exercised by the problems
    above: at expert=8 the balanced routing fits the capacity; the skewed one does not, nor (dense)
    the padded one (its padding rows all go to expert 0)."""
    from dsv3_jax.parallel.expert import capacity_rows

    P, n = 8, 40
    assert capacity_rows(n // P * K, P, 0.0) == n // P * K  # factor 0: full blocks, no branch
    for tokens, skew, fits in ((40, False, True), (37, False, False), (40, True, False)):
        ids = np.asarray(_problem(tokens, skew)[2])
        ids = np.pad(ids, ((0, n - tokens), (0, 0))).reshape(P, n // P * K)  # [src device, its rows]
        sent = np.stack([np.bincount(row // (E // P), minlength=P) for row in ids])  # [src,dst]
        assert (sent.max() <= capacity_rows(n // P * K, P, 1.25)) == fits
    for skew, fits in ((False, True), (True, False)):  # gather: each device's share of all assignments
        ids = np.asarray(_problem(40, skew)[2]).reshape(-1)
        assert (np.bincount(ids // (E // P), minlength=P).max() <= capacity_rows(40 * K, P, 1.25)) == fits


@pytest.mark.parametrize("spec,transport,capacity", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("n,skew", [(40, False), (37, False), (40, True)],
                         ids=["balanced", "padded", "all-to-one-device"])
def test_expert_parallel_equals_local(spec, transport, capacity, n, skew):
    args = _problem(n, skew)  # 37: not a multiple of the batch shards (padded inside)
    (ref_loss, ref_y), ref_grads = _grad()(*args)
    mesh = make_mesh(spec)
    with jax.set_mesh(mesh), expert_transport(transport, capacity_factor=capacity):
        (loss, y), grads = _grad()(*args)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_transport_selection():
    assert choose_transport("auto", "cpu") == "dense"
    assert choose_transport("auto", "gpu", n_ep=2) == "gather"  # NCCL all_gather beats the one-shot kernel
    assert choose_transport("auto", "gpu", n_ep=8) == "gather"
    assert choose_transport("auto", "gpu", n_ep=16) == "ragged"  # the gathered tokens grow with P
    assert choose_transport("auto", "tpu") == "ragged"
    assert choose_transport("dense", "gpu") == "dense"
    with pytest.raises(ValueError, match="not implemented on 'cpu'"):
        choose_transport("ragged", "cpu")
    with pytest.raises(ValueError, match="choose from"):
        choose_transport("fast")
    with pytest.raises(ValueError, match="choose from"):
        with expert_transport("fast"):
            pass
    for factor in (-1.0, float("nan"), float("inf")):  # inf failed at trace time: OverflowError in ceil
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            with expert_transport("dense", capacity_factor=factor):
                pass


def test_take_rows_gathers_both_ways_and_matches_a_plain_gather():
    """A partial permutation with zero rows (index == len(x)): value and gradient equal
    autodiff through numpy-style indexing of x padded with a zero row."""
    from dsv3_jax.parallel.expert import inverse_permutation, take_rows

    x = jax.random.normal(jax.random.key(1), (5, 3))
    index = jnp.asarray([3, 5, 0, 5, 4, 1, 2], jnp.int32)  # 7 output rows, two of them zero
    inverse = jnp.asarray([2, 5, 6, 0, 4], jnp.int32)  # row j of x lands in output row inverse[j]
    np.testing.assert_array_equal(inverse_permutation(jnp.asarray([3, 0, 4, 1, 2], jnp.int32)), [1, 3, 4, 0, 2])
    g = jax.random.normal(jax.random.key(2), (7, 3))
    plain = lambda x: jnp.concatenate([x, jnp.zeros((1, 3))])[index]
    np.testing.assert_array_equal(take_rows(x, index, inverse), plain(x))
    np.testing.assert_allclose(jax.vjp(lambda x: take_rows(x, index, inverse), x)[1](g)[0],
                               jax.vjp(plain, x)[1](g)[0])


def test_expert_parallel_with_the_ragged_grouped_matmul():
    """The TPU default kernel ("ragged", custom gradient) under the expert shard_map: its
    weight gradient is summed over the token axes the weights do not vary over."""
    from dsv3_jax import kernels

    args = _problem(37, False)
    (_, ref_y), ref_grads = _grad()(*args)
    with jax.set_mesh(make_mesh("data=2,expert=-1")), kernels.use(grouped_matmul="ragged"):
        (_, y), grads = _grad()(*args)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def _place_reference(ids, E, C):
    """The layout `place` promises, in NumPy: expert e's first C assignments (in order) in block
    e, the rest grouped by expert after them; padding (id E) nowhere."""
    blocks = np.full((E, C), len(ids))
    rows = []
    for e in range(E):
        mine = np.flatnonzero(ids == e)
        blocks[e, :min(C, len(mine))] = mine[:C]
        rows.extend(mine[C:])
    return blocks.reshape(-1), np.asarray(rows, int), np.asarray([max((ids == e).sum() - C, 0) for e in range(E)])


@pytest.mark.parametrize("tight", [False, True], ids=["room-for-any", "rows-that-fit"])
@pytest.mark.parametrize("C", [0, 3, 8])
def test_place_lays_rows_out_as_numpy_does(C, tight):
    from dsv3_jax.parallel.expert import place

    E = 5
    ids = np.random.RandomState(0).choice(E + 1, 40, p=[0.4, 0.1, 0.2, 0.05, 0.05, 0.2])  # id 5: padding
    want_blocks, want_rows, want_sizes = _place_reference(ids, E, C)
    p = place(jnp.asarray(ids, jnp.int32), E, C, len(want_rows) + 2 if tight else None)
    np.testing.assert_array_equal(p.block_src, want_blocks)
    R = p.row_src.shape[0]
    assert R == (len(want_rows) + 2 if tight else len(ids) - C if C else len(ids))  # room for any routing
    np.testing.assert_array_equal(p.row_src[:len(want_rows)], want_rows)
    assert (np.asarray(p.row_src[len(want_rows):]) == len(ids)).all()
    np.testing.assert_array_equal(p.sizes, want_sizes)
    for src, dest, n in ((p.block_src, p.block_dest, E * C), (p.row_src, p.row_dest, R)):  # inverses
        src, dest = np.asarray(src), np.asarray(dest)
        placed = dest < n
        np.testing.assert_array_equal(src[dest[placed]], np.flatnonzero(placed))
        assert (np.asarray(p.block_dest < E * C) ^ np.asarray(p.row_dest < R))[ids < E].all()  # exactly one place
    assert ((np.asarray(p.block_dest) == E * C) & (np.asarray(p.row_dest) == R))[ids == E].all()


@pytest.mark.parametrize("n,skew", [(40, False), (37, False), (40, True)], ids=["balanced", "padded", "all-to-few"])
def test_blocks_layout_equals_grouped(n, skew):
    """The "blocks" layout (batched blocks + grouped overflow; the skewed routing overflows
    most rows) gives the grouped layout's outputs and gradients."""
    from dsv3_jax import kernels

    args = _problem(n, skew)
    (_, ref_y), ref_grads = _grad()(*args)
    with kernels.use(expert_layout="blocks"):
        (_, y), grads = _grad()(*args)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("transport", ["dense", "gather"])
@pytest.mark.parametrize("n,skew", [(40, False), (40, True)], ids=["balanced", "all-to-one-device"])
def test_expert_parallel_blocks_layout_equals_local(n, skew, transport):
    """Expert-parallel with the "blocks" layout on each device's rows (received, or gathered)."""
    from dsv3_jax import kernels

    args = _problem(n, skew)
    (_, ref_y), ref_grads = _grad()(*args)
    with jax.set_mesh(make_mesh(MESHES[1])), expert_transport(transport), kernels.use(expert_layout="blocks"):
        (_, y), grads = _grad()(*args)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("transport", ["dense", "gather"])
def test_expert_parallel_under_the_fp8_recipe(transport):
    """The FP8 grouped matmul's custom gradient under the expert shard_map. Forward and input
    gradient quantize per token row (1x128 tiles), so they match the local run; the weight
    gradients quantize 128-row tiles of each expert's rows in the order its device receives them
    (not the local run's order), so they agree to E4M3's precision (2^-4), not bitwise."""
    from dsv3_jax import fp8

    args = _problem(40, False)
    with fp8.use(fp8.recipe_for("fp8_emulated")):
        (_, ref_y), ref_grads = _grad()(*args)
        with jax.set_mesh(make_mesh(MESHES[1])), expert_transport(transport):
            (_, y), grads = _grad()(*args)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads[:2], ref_grads[:2], strict=True):  # x, router weights
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
    for g, r in zip(grads[2:], ref_grads[2:], strict=True):  # gate_up, down
        assert np.linalg.norm(np.asarray(g) - r) < 2 ** -4 * np.linalg.norm(r)


@pytest.mark.parametrize("recipe", [None, "fp8_emulated"])
@pytest.mark.parametrize("layout", ["grouped", "blocks"])
def test_gate_and_up_as_one_product_equal_two(recipe, layout):
    """`expert_ffn` runs gate and up as one product on gate_up viewed as [E,D,2F] (padded under
    FP8); with the grouped matmul called once per projection instead (and under FP8 each weight
    quantised on its own 128x128 blocks, F = 6 not a multiple of the block), outputs and
    gradients are the same."""
    from dsv3_jax import fp8, kernels
    from dsv3_jax.fp8 import grouped_matmul
    from dsv3_jax.kernels.grouped_matmul import block_matmul
    from dsv3_jax.parallel.expert import ExpertRows, expert_ffn

    x, _, ids, gate_up, down = _problem(40, False)
    sizes = jnp.bincount(ids.reshape(-1), length=E).astype(jnp.int32)
    rows = jax.random.normal(jax.random.key(1), (int(sizes.sum()), D))
    blocks = jax.random.normal(jax.random.key(2), (E, 2 if layout == "blocks" else 0, D))
    r = fp8.recipe_for(recipe) if recipe else None

    def two(blocks, rows, gate_up, down):
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]  # [E,D,F] each
        gm = lambda a, w: grouped_matmul(a, w, sizes, r)
        bm = block_matmul
        return ((bm(jax.nn.silu(bm(blocks, gate)) * bm(blocks, up), down) if blocks.shape[1] else blocks),
                gm(jax.nn.silu(gm(rows, gate)) * gm(rows, up), down))

    def one(blocks, rows, gate_up, down):
        y = expert_ffn(ExpertRows(blocks, rows, sizes), gate_up, down)
        return y.blocks, y.rows

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda *a: sum((y * jnp.cos(y)).sum() for y in f(*a)), argnums=range(4)))

    with fp8.use(r), kernels.use(expert_layout=layout):
        ref, ref_grads = loss(two)(blocks, rows, gate_up, down)
        got, grads = loss(one)(blocks, rows, gate_up, down)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for g, want in zip(grads, ref_grads, strict=True):  # fp32 rounding at each gradient's scale
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-6 * np.abs(want).max(initial=0))


@pytest.mark.parametrize("layout", ["grouped", "blocks"])
def test_pallas_row_moves_equal_xla(layout):
    """The Pallas dispatch and combine (interpret mode here) give the XLA forms' outputs and
    gradients through the routed experts (under "blocks", the assignments in blocks are on no
    grouped row)."""
    from dsv3_jax import kernels

    args = _problem(37, False)
    (_, ref_y), ref_grads = _grad()(*args)
    with kernels.use(row_gather="pallas", expert_layout=layout):
        (_, y), grads = _grad()(*args)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_row_moves_default_to_xla_under_a_mesh():
    from dsv3_jax.kernels import row_gather

    with jax.set_mesh(make_mesh(MESHES[1])):
        assert row_gather.default_impl() == "xla"
