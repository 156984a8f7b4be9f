"""A layer stack's elementwise update, both implementations, against NumPy.

Three layers whose size is not a multiple of the kernel's block, arrays of three dtypes
updated together, a gradient in a fourth and a scalar. "pallas" runs its kernel in interpret
mode here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import kernels
from dsv3_jax.kernels import layer_update

L, SHAPE = 3, (7, 300)  # 2,100 elements a layer: two full blocks and a partial one


def _step(arrays, g, scalars):
    """w -= s * g (in float32), n += 1, h = |w| as bfloat16."""
    w, n, h = arrays
    (s,) = scalars
    w = w - s * g.astype(jnp.float32)
    return w, n + 1, jnp.abs(w)


@pytest.mark.parametrize("impl", layer_update.IMPLS)
def test_update_matches_numpy_layer_by_layer(impl):
    rs = np.random.RandomState(0)
    w = rs.randn(L, *SHAPE).astype(np.float32)
    n = rs.randint(0, 100, (L, *SHAPE)).astype(np.int32)
    h = np.zeros((L, *SHAPE), np.float32)
    g = rs.randn(L, *SHAPE).astype(np.float32)
    with kernels.use(layer_update=impl):
        f = jax.jit(lambda w, n, h, g: layer_update.update_layers(_step, (w, n, h), g, (jnp.float32(0.5),)))
        out = f(jnp.asarray(w), jnp.asarray(n), jnp.asarray(h, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16))
    g16 = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float32)
    want = w - np.float32(0.5) * g16
    assert [x.dtype for x in out] == [jnp.float32, jnp.int32, jnp.bfloat16]
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(out[1], n + 1)
    np.testing.assert_array_equal(np.asarray(out[2], np.float32), np.asarray(jnp.asarray(np.abs(want), jnp.bfloat16),
                                                                             np.float32))


def test_default_is_xla_off_gpu_for_small_layers_and_huge_stacks_and_unknown_impl_is_named():
    big = (2, layer_update.MIN_LAYER)
    assert layer_update.default_impl(big) == ("pallas" if jax.default_backend() == "gpu" else "xla")
    assert layer_update.default_impl((2, layer_update.MIN_LAYER - 1)) == "xla"
    assert layer_update.default_impl((2, 2 ** 30)) == "xla"
    with pytest.raises(ValueError, match="layer_update impl 'cuda'"):
        layer_update.update_layers(_step, (jnp.zeros((2, 3)),) * 3, jnp.zeros((2, 3)), (1.0,), impl="cuda")
