"""Loading straight into a mesh: every device gets only its slices, values as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
from convert_testlib import make_hf

from dsv3_jax import parallel
from dsv3_jax.convert import convert_hf, load_checkpoint, load_hf


def test_load_hf_and_checkpoint_onto_a_mesh(tmp_path):
    make_hf(tmp_path / "hf", seed=3, mtp=True, n_routed_experts=8)
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", param_dtype=jnp.float32)
    mesh = parallel.make_mesh("data=2,expert=4")
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 96, (4, 12)))
    _, single = load_hf(tmp_path / "hf")
    expected = single(tokens).logits
    for name, (_, model) in (("hf", load_hf(tmp_path / "hf", mesh=mesh)),
                             ("ckpt", load_checkpoint(tmp_path / "ckpt", mesh=mesh))):
        experts = model.moe_layers.mlp.experts.gate_up_proj[...]
        assert experts.sharding.mesh.shape["expert"] == 4
        shard = experts.addressable_shards[0].data
        assert shard.shape[1] == experts.shape[1] // 4, name  # each device holds 2 of the 8 experts
        with jax.set_mesh(mesh):
            np.testing.assert_allclose(model(tokens).logits, expected, rtol=1e-5, atol=1e-6, err_msg=name)
