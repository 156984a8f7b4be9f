"""The model on four meshes equals the unsharded model: loss, logits, expert load and gradients (fp32).

Each mesh compiles one jitted loss+grad step (module-scoped); the reference is the model built by
its own constructor on one device, outside any mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parallel_testlib import CONFIG, F32, loss_and_grads, reference_model, tokens

from dsv3_jax.parallel import create_model, make_mesh, shard_batch

MESHES = ["data=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2", "expert=8"]


@pytest.fixture(scope="module")
def reference():
    model = reference_model(seed=0)
    loss, logits, load, grads = loss_and_grads(model, jnp.asarray(tokens()))
    return dict(params=nnx.to_pure_dict(nnx.state(model)), loss=loss, logits=logits, load=load, grads=grads)


@pytest.fixture(scope="module", params=MESHES)
def sharded(request):
    mesh = make_mesh(request.param)
    with jax.set_mesh(mesh):
        model = create_model(CONFIG, mesh, seed=0, **F32)
        loss, logits, load, grads = loss_and_grads(model, shard_batch(tokens(), mesh))
    return dict(mesh=mesh, model=model, loss=loss, logits=logits, load=load, grads=grads)


def _close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_created_sharded_params_equal_the_constructor(sharded, reference):
    # jitted vs eager init: the same random draws, rounded within an ulp
    _close(nnx.to_pure_dict(nnx.state(sharded["model"])), reference["params"], rtol=3e-7, atol=0)


def test_forward_and_expert_load_match_one_device(sharded, reference):
    np.testing.assert_allclose(float(sharded["loss"]), float(reference["loss"]), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(sharded["logits"]), np.asarray(reference["logits"]), rtol=1e-5, atol=2e-6)
    # tokens per expert over the whole global batch (B*T per MoE layer), not one shard's
    np.testing.assert_array_equal(np.asarray(sharded["load"]), np.asarray(reference["load"]))
    main = np.asarray(reference["load"])[:CONFIG.num_moe_layers]
    np.testing.assert_array_equal(main.sum(-1), tokens().size * CONFIG.num_experts_per_tok)


def test_gradients_match_one_device(sharded, reference):
    _close(sharded["grads"], reference["grads"], rtol=1e-4, atol=1e-7)


def test_parameters_and_activations_are_sharded_by_the_rules(sharded):
    mesh, m = sharded["mesh"], sharded["model"]
    size = dict(mesh.shape)

    def spec(x):
        s = x[...].sharding
        assert s.mesh.shape == mesh.shape
        return tuple(s.spec) + (None,) * (x.ndim - len(s.spec))

    def keep(*axes):  # what the rules give once size-1 mesh axes drop out
        return tuple(a if a is not None and size[a] > 1 else None for a in axes)

    experts = m.moe_layers.mlp.experts
    assert spec(experts.gate_up_proj) == keep(None, "expert", "fsdp", None, "tensor")  # [L,E,D,2,F]
    assert spec(experts.down_proj) == keep(None, "expert", "tensor", "fsdp")  # [L,E,F,D]
    assert spec(m.embed.embedding) == keep("tensor", "fsdp")  # [V,D]
    assert spec(m.lm_head.kernel) == keep("fsdp", "tensor")  # [D,V]
    assert spec(m.dense_layers.attn.q_b_proj.kernel) == keep(None, None, "tensor")  # [L,R,H*K]
    assert spec(m.dense_layers.attn.o_proj.kernel) == keep(None, "tensor", "fsdp")  # [L,H*K,D]
    assert spec(m.dense_layers.mlp.gate_proj.kernel) == keep(None, "fsdp", "tensor")  # [L,D,F]
    assert spec(m.moe_layers.mlp.router.bias) == (None, None)
    batch = tuple(a for a in ("data", "fsdp", "expert") if size[a] > 1)
    logits = sharded["logits"].sharding.spec
    assert tuple(logits[0] if isinstance(logits[0], tuple) else (logits[0],)) == batch
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    per_device = sum(s.data.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))
                     for s in x.addressable_shards if s.device == jax.devices()[0])
    if size["data"] < 8:  # something besides data is split: device 0 holds a strict part of the model
        assert per_device < n_params
