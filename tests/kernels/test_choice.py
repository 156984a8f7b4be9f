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


def test_attention_auto_takes_cudnn_for_what_it_takes_where_it_runs(monkeypatch):
    """cuDNN's kernel takes plain causal bf16/fp16 attention only, and is the default on one
    device only: "auto" keeps the rest on tokamax (or xla); a forced "cudnn" with documents is
    refused by name."""
    q, v = jnp.ones((1, 4, 2, 192), jnp.bfloat16), jnp.ones((1, 4, 2, 128), jnp.bfloat16)
    assert attention.cudnn_takes(q, v, None)
    assert not attention.cudnn_takes(q, v, jnp.zeros((1, 4), jnp.int32))  # packed documents
    assert not attention.cudnn_takes(q.astype(jnp.float32), v.astype(jnp.float32), None)
    assert not attention.cudnn_takes(jnp.ones((1, 4, 2, 20), jnp.bfloat16), v, None)  # head dim not a multiple of 8
    monkeypatch.setattr(attention, "_cudnn_runs_here", lambda: True)
    monkeypatch.setattr(attention, "_tokamax_runs_here", lambda: True)
    assert attention.default_impl(cudnn_ok=True) == "cudnn"
    assert attention.default_impl(cudnn_ok=False) == "tokamax"
    with jax.set_mesh(make_mesh("data=2,expert=4")):  # a multi-device mesh keeps the kernel measured there
        assert attention.default_impl(cudnn_ok=True) == "tokamax"
    with kernels.use(attention="xla"):
        assert attention.default_impl(cudnn_ok=True) == "xla"
    monkeypatch.setattr(attention, "_cudnn_runs_here", lambda: False)
    assert attention.default_impl(cudnn_ok=True) == "tokamax"
    q = jnp.ones((1, 4, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="'cudnn' takes no packed documents"):
        attention.dot_product_attention(q, q, q[..., :8], jnp.zeros((1, 4), jnp.int32), 0.25, impl="cudnn")


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
