"""Mesh specs, the rules table, placement of host arrays, batches."""

import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from parallel_testlib import CONFIG, F32

from dsv3_jax.model import DeepSeekV3
from dsv3_jax.parallel import (
    AXES,
    batch_sharding,
    flat_shardings,
    logical_to_spec,
    make_mesh,
    param_shardings,
    parse_mesh_spec,
    place,
    process_rows,
    shard_batch,
    shard_like,
)


@pytest.mark.parametrize("spec, sizes", [
    (None, (8, 1, 1, 1)),
    ("data=2,fsdp=1,expert=4,tensor=1", (2, 1, 4, 1)),
    ("expert=-1,tensor=2", (1, 1, 4, 2)),
    ({"fsdp": 2, "expert": 2, "tensor": 2}, (1, 2, 2, 2)),
    (" data = -1 ", (8, 1, 1, 1)),
])
def test_mesh_spec_sizes(spec, sizes):
    assert tuple(parse_mesh_spec(spec, 8)[a] for a in AXES) == sizes
    mesh = make_mesh(spec)
    assert mesh.axis_names == AXES and tuple(mesh.shape.values()) == sizes


@pytest.mark.parametrize("spec, message", [
    ("data=3", "3 x 1 x 1 x 1 = 3 devices, but there are 8"),
    ("data=2,expert=2", "= 4 devices, but there are 8"),
    ("model=8", "unknown axis 'model'"),
    ("data=2,data=4", "given twice"),
    ("data=two", "not an integer"),
    ({"data": 8.9}, "is 8.9, not an integer"),  # was truncated to 8
    ({"data": True, "expert": 8}, "is True, not an integer"),
    ("data=-1,expert=-1", "only one axis may be -1"),
    ("data=3,expert=-1", "do not split"),
    ("data=0", "positive or -1"),
    ("data:8", "not AXIS=SIZE"),
])
def test_mesh_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)


def test_make_mesh_on_a_device_subset():
    mesh = make_mesh("expert=2,tensor=2", devices=jax.devices()[:4])
    assert mesh.devices.size == 4 and mesh.shape["expert"] == 2


def test_rules_refuse_collisions_and_unknown_names():
    sizes = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    with pytest.raises(ValueError, match="mesh axes \\['fsdp'\\] on two dimensions"):
        logical_to_spec(("embed", "embed"), (8, 8), sizes)
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("embed", "nonsense"), (8, 8), sizes)
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), (8, 8), sizes)
    assert logical_to_spec(("batch", None), (8, 3), sizes) == P(("data", "fsdp", "expert"), None)
    assert logical_to_spec(("expert", "embed", "expert_mlp"), (4, 6, 5), sizes) == P("expert", "fsdp", None)
    # a dimension the mesh axes do not divide stays whole
    assert logical_to_spec(("expert", "embed"), (3, 6), sizes) == P(None, "fsdp")


@pytest.fixture(scope="module")
def abstract():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepSeekV3(CONFIG, rngs=nnx.Rngs(0), **F32)))
    return graphdef, state


def test_every_parameter_has_logical_axes(abstract):
    _, state = abstract
    for path, v in nnx.to_flat_state(nnx.state(state, nnx.Param)):
        names = v.get_metadata().get("logical_axes")
        assert names is not None and len(names) in (v.ndim, v.ndim - 1), path


def test_shard_like_places_host_arrays_into_their_shardings(abstract):
    graphdef, state = abstract
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    reference = DeepSeekV3(CONFIG, rngs=nnx.Rngs(1), **F32)
    host = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(reference)))
    placed = shard_like(host, state, mesh)
    want = param_shardings(state, mesh)
    for (path, v), (_, s) in zip(nnx.to_flat_state(placed), nnx.to_flat_state(want), strict=True):
        assert v[...].sharding == s.get_value(), path
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, placed))), host)
    flat = flat_shardings(state, mesh)
    assert flat["moe_layers/mlp/experts/gate_up_proj"].spec == P(None, "expert", "fsdp", None, "tensor")
    assert flat["embed/embedding"].spec == P("tensor", "fsdp")


def test_place_reads_only_the_owned_slices():
    mesh = make_mesh("expert=4,tensor=2")
    reads = []

    class Lazy:  # a lazily read host tensor (a safetensors slice, a memmap)
        shape = (8, 6)

        def __getitem__(self, index):
            reads.append(index)
            return np.arange(48, dtype=np.float32).reshape(8, 6)[index]

    x = place(Lazy(), NamedSharding(mesh, P("expert", "tensor")), dtype=np.float16)
    assert x.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(x), np.arange(48).reshape(8, 6))
    assert all(np.empty((8, 6))[i].size == 6 for i in reads)  # one [2, 3] block per read


def test_batches_split_over_data_fsdp_expert():
    mesh = make_mesh("data=2,fsdp=2,expert=2")
    assert batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)
    assert process_rows(mesh, 16) == slice(0, 16)  # one process feeds everything
    batch = np.arange(32, dtype=np.int32).reshape(16, 2)
    x = shard_batch(batch, mesh)
    assert x.sharding.spec == P(("data", "fsdp", "expert"), None)
    assert {s.data.shape for s in x.addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(np.asarray(x), batch)


def test_optimizer_state_shards_like_its_params(abstract):
    import optax

    _, state = abstract
    params = nnx.state(state, nnx.Param)
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    opt = param_shardings(jax.eval_shape(optax.adamw(1e-3).init, params), mesh)
    mu = nnx.to_pure_dict(opt[0].mu)
    assert mu["moe_layers"]["mlp"]["experts"]["gate_up_proj"].spec == P(None, "expert", "fsdp", None, "tensor")
    assert opt[0].count.spec == P()


def test_micro_batched_batches_split_on_their_batch_dim():
    mesh = make_mesh("data=2,expert=4")
    x = shard_batch(np.zeros((3, 8, 5), np.int32), mesh, batch_dim=1)
    assert x.shape == (3, 8, 5) and x.sharding == batch_sharding(mesh, ndim=3, batch_dim=1)
    assert x.sharding.spec == P(None, ("data", "fsdp", "expert"), None)


@pytest.mark.parametrize("spec, changes, message", [
    ("expert=8", {}, r"mesh expert=8 must divide n_routed_experts=4"),
    ("data=2,tensor=4", {}, r"mesh tensor=4 must divide num_attention_heads=2"),
    ("fsdp=8", dict(hidden_size=60), r"mesh fsdp=8 must divide hidden_size=60"),  # every weight stayed whole
    ("data=4,tensor=2", dict(moe_intermediate_size=33), r"mesh tensor=2 must divide moe_intermediate_size=33"),
    ("data=4,tensor=2", dict(intermediate_size=129), r"mesh tensor=2 must divide intermediate_size=129"),
])
def test_meshes_that_would_not_split_what_they_shard_are_refused(spec, changes, message):
    from dsv3_jax import parallel
    from dsv3_jax.config import ModelConfig

    config = ModelConfig.preset("tiny", n_routed_experts=4, n_group=2, topk_group=1, num_attention_heads=2,
                                num_key_value_heads=2, **changes)
    with pytest.raises(ValueError, match=message):
        parallel.create_model(config, parallel.make_mesh(spec))


def test_an_unused_dense_hidden_size_need_not_divide():
    """With no dense layer intermediate_size is no weight's size: any value is fine."""
    from dsv3_jax import parallel
    from dsv3_jax.config import ModelConfig

    config = ModelConfig.preset("tiny", first_k_dense_replace=0, intermediate_size=129)
    parallel.check_fits(config, parallel.make_mesh("data=4,tensor=2"))


def test_a_vocabulary_the_tensor_axis_does_not_divide_stays_whole_with_a_warning():
    from dsv3_jax import parallel
    from dsv3_jax.config import ModelConfig

    mesh = parallel.make_mesh("data=2,tensor=4")
    with pytest.warns(UserWarning, match=r"mesh tensor=4 does not divide vocab_size=514: the embedding and the LM "
                                         r"head stay whole .* padded to a multiple of 4"):
        parallel.check_fits(ModelConfig.preset("tiny", vocab_size=514), mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.check_fits(ModelConfig.preset("tiny", vocab_size=516), mesh)


def test_every_public_name_is_exported():
    import dsv3_jax.parallel as parallel

    assert [n for n in parallel.__all__ if not hasattr(parallel, n)] == []  # `import *` fails on any
