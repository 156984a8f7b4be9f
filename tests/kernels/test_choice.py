import jax
import jax.numpy as jnp
import pytest

from dsv3_jax import kernels
from dsv3_jax.kernels import attention, grouped_matmul, latent_attention
from dsv3_jax.parallel import make_mesh
from dsv3_jax.train.config import TrainConfig


def test_use_forces_kernels_while_tracing_and_restores():
    before = attention.default_impl(), grouped_matmul.default_impl()
    x, w, sizes = jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.array([5, 3])
    with kernels.use(grouped_matmul="ragged"):
        assert grouped_matmul.default_impl() == "ragged"
        assert attention.default_impl() == before[0]  # "auto" keeps the backend's choice
        jaxpr = str(jax.make_jaxpr(lambda *a: grouped_matmul.grouped_matmul(*a))(x, w, sizes))
    assert "ragged_dot" in jaxpr
    with kernels.use(grouped_matmul="tiled"):
        assert "ragged_dot" not in str(jax.make_jaxpr(lambda *a: grouped_matmul.grouped_matmul(*a))(x, w, sizes))
    assert (attention.default_impl(), grouped_matmul.default_impl()) == before


def test_latent_attention_auto_is_the_kernel_for_decode_steps_on_gpu_only(monkeypatch):
    """"auto": the Pallas kernel for a few query tokens on a GPU; the prefill (many tokens) and
    other backends take the XLA form; `kernels.use` overrides."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert latent_attention.default_impl(1, 512, 64) == "pallas"
    assert latent_attention.default_impl(latent_attention.MAX_PALLAS_TOKENS + 1, 512, 64) == "xla"
    with kernels.use(latent_attention="xla"):
        assert latent_attention.default_impl(1, 512, 64) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert latent_attention.default_impl(1, 512, 64) == "xla"


def test_attention_auto_takes_hopper_then_cudnn_for_what_they_take_where_they_run(monkeypatch):
    """Plain causal attention on one device goes to our Hopper backward where its kernels take
    the shapes, else to cuDNN's where that takes them; "auto" keeps packed documents, other
    dtypes and multi-device meshes on tokamax (or xla); a forced "hopper" or "cudnn" with
    documents, or "hopper" with shapes it does not take, is refused by name."""
    q, v = jnp.ones((1, 128, 2, 192), jnp.bfloat16), jnp.ones((1, 128, 2, 128), jnp.bfloat16)
    assert attention.cudnn_takes(q, v)
    assert not attention.cudnn_takes(q.astype(jnp.float32), v.astype(jnp.float32))
    assert not attention.cudnn_takes(jnp.ones((1, 128, 2, 20), jnp.bfloat16), v)  # head dim not a multiple of 8
    for name in ("_hopper_runs_here", "_cudnn_runs_here", "_tokamax_runs_here"):
        monkeypatch.setattr(attention, name, lambda: True)
    documents = jnp.zeros((1, 128), jnp.int32)
    assert attention.default_impl(q, v) == "hopper"
    assert attention.default_impl(q[:, :100], v[:, :100]) == "cudnn"  # T off the 128-key blocks
    assert attention.default_impl(q, v, documents) == "tokamax"
    assert attention.default_impl(q.astype(jnp.float32), v.astype(jnp.float32)) == "tokamax"
    assert attention.default_impl() == "tokamax"
    with jax.set_mesh(make_mesh("data=2,expert=4")):  # a multi-device mesh keeps the kernel measured there
        assert attention.default_impl(q, v) == "tokamax"
    with kernels.use(attention="xla"):
        assert attention.default_impl(q, v) == "xla"
    monkeypatch.setattr(attention, "_hopper_runs_here", lambda: False)
    assert attention.default_impl(q, v) == "cudnn"
    monkeypatch.setattr(attention, "_cudnn_runs_here", lambda: False)
    assert attention.default_impl(q, v) == "tokamax"
    for impl in ("hopper", "cudnn"):
        with pytest.raises(ValueError, match=f"'{impl}' takes no packed documents"):
            attention.dot_product_attention(q, q, v, documents, 0.25, impl=impl)
    with pytest.raises(ValueError, match="'hopper' needs a Hopper GPU and tokamax"):
        attention.dot_product_attention(q, q, v, None, 0.25, impl="hopper")
    monkeypatch.setattr(attention, "_hopper_runs_here", lambda: True)
    with pytest.raises(ValueError, match="'hopper' takes bf16/fp16 q"):
        attention.dot_product_attention(q[:, :100], q[:, :100], v[:, :100], None, 0.25, impl="hopper")


def test_bad_kernel_names_are_refused():
    with pytest.raises(ValueError, match="attention impl 'flash': choose from"):
        with kernels.use(attention="flash"):
            pass
    with pytest.raises(ValueError, match="latent_attention impl 'flashmla': choose from"):
        with kernels.use(latent_attention="flashmla"):
            pass
    with pytest.raises(ValueError, match="TrainConfig.grouped_matmul_impl"):
        TrainConfig(grouped_matmul_impl="megablox")
    with pytest.raises(ValueError, match="expert_layout impl 'capacity': choose from"):
        with kernels.use(expert_layout="capacity"):
            pass
    with pytest.raises(ValueError, match="TrainConfig.expert_layout"):
        TrainConfig(expert_layout="dense")
    with pytest.raises(ValueError, match="TrainConfig.expert_transport"):
        TrainConfig(expert_transport="nccl")
    with pytest.raises(ValueError, match="TrainConfig.expert_capacity_factor=-1"):
        TrainConfig(expert_capacity_factor=-1)
    with pytest.raises(ValueError, match="TrainConfig.scan_unroll=-1"):
        TrainConfig(scan_unroll=-1)
