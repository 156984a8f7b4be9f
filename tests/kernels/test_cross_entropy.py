"""The loss chunk's softmax passes, both implementations, against NumPy in float64.

Row counts that are not a multiple of the gradient kernel's row block, vocabularies that are not
a multiple of the column blocks (one under a block, one over the log-sum-exp's 4096 columns) and
rows whose logits are far from 0. "pallas" runs its kernels in interpret mode here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import kernels
from dsv3_jax.kernels import cross_entropy


@pytest.mark.parametrize("impl", cross_entropy.IMPLS)
@pytest.mark.parametrize("n,V", [(5, 1000), (3, 5000)])
def test_logsumexp_and_gradient_match_numpy(impl, n, V):
    rs = np.random.RandomState(V)
    x = (rs.randn(n, V) * 4 + rs.choice([-80.0, 0.0, 60.0], (n, 1))).astype(np.float32)
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # the bf16 logits' values
    targets, weight = rs.randint(0, V, n), rs.rand(n).astype(np.float32)

    with kernels.use(cross_entropy=impl):
        f = jax.jit(lambda x, t, w: (lse := cross_entropy.logsumexp(x), cross_entropy.xent_grad(x, lse, t, w)))
        lse, grad = f(jnp.asarray(x, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(weight))

    x64 = x.astype(np.float64)
    top = x64.max(1, keepdims=True)
    ref_lse = (top + np.log(np.exp(x64 - top).sum(1, keepdims=True)))[:, 0]
    ref_grad = weight[:, None] * (np.exp(x64 - ref_lse[:, None]) - np.eye(V)[targets])
    assert lse.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float32), ref_grad, rtol=2 ** -8, atol=1e-7)


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="cross_entropy impl 'liger'"):
        cross_entropy.logsumexp(jnp.zeros((2, 4)), impl="liger")
    with pytest.raises(ValueError, match="cross_entropy impl"):
        kernels.validate("cross_entropy", "liger")
