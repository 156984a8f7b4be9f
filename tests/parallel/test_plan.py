"""The scale plan: its byte accounting equals the real sharded arrays, SPEC's facts hold, and the
real train step lowers for reduced-depth 671B shapes on 8 and 64 fake devices."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx
from xla_env import QUICK_COMPILE

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import RouterBias
from dsv3_jax.parallel import create_model, make_mesh, param_shardings, plan
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.optimizer import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = [("tiny", "data=8"), ("tiny", "expert=8"), ("tiny", "fsdp=2,expert=2,tensor=2"), ("small", "fsdp=8"),
         ("small", "data=2,tensor=4")]


def _per_device(tree) -> dict:
    out = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@pytest.mark.parametrize(("preset", "spec"), CASES)
def test_accounting_equals_the_real_sharded_arrays(preset, spec):
    config = ModelConfig.preset(preset)
    mesh = make_mesh(spec)
    model = create_model(config, mesh)
    _, params, bias = nnx.split(model, nnx.Param, RouterBias)
    tx = make_optimizer(TrainConfig(moments_dtype="bfloat16"))
    opt = jax.jit(tx.init, out_shardings=param_shardings(jax.eval_shape(tx.init, params), mesh))(params)
    s = plan.make_setup(config, spec, 8, batch=8, seq=16, moments="bfloat16")
    got = plan.account(s, activations=False)
    assert set(_per_device(params).values()) | set(_per_device(bias).values()) and all(
        p + b == got["params"] for p, b in zip(_per_device(params).values(), _per_device(bias).values(), strict=True))
    assert set(_per_device(opt).values()) == {got["optimizer"]}


def test_spec_facts_for_671b():
    config = ModelConfig.preset("v3_671b")
    counts = plan.parameter_counts(config)
    assert abs(counts["main"] / 671e9 - 1) < 0.001  # SPEC: 671B + the MTP module
    assert 11.5e9 <= counts["mtp"] <= 11.7e9  # SPEC D: 11.5B unique MTP parameters
    assert 37e9 <= counts["active"] < 38e9  # SPEC: 37B activated per token
    s = plan.make_setup(config, "data=1", 1, batch=1, seq=1, decode_batch=1, context=1)
    assert plan.kv_cache_bytes(s) == 70_272  # SPEC B: 61 layers x 576 bf16 values
    s = plan.make_setup(config, "data=8,expert=8", 64, batch=64, seq=4096, decode_batch=64, context=1000)
    assert plan.kv_cache_bytes(s) == 1000 * 70_272  # one row per batch shard
    # ragged: 4 moves/layer of 1 x 4096 x 8 rows x 7168 bf16, 7/8 of them leaving, 58 + 1 MoE layers
    assert plan.all_to_all_bytes(s) == 4 * 4096 * 8 * 7168 * 2 * 7 // 8 * 59
    # gather: 4096 tokens to 7 others, as x, cotangent, fp32 partial sums and input gradient, + weights/ids
    assert plan.all_to_all_bytes(s, "gather") == 7 * 4096 * (7168 * (2 + 2 + 4 + 2) + 8 * 12) * 59


def test_activation_model_shrinks_with_remat_and_flash():
    config = ModelConfig.preset("v3_671b").replace(num_hidden_layers=4)
    acts = {}
    for attention in plan.ATTENTION:
        s = plan.make_setup(config, "fsdp=2,expert=4", 8, batch=8, seq=1024, attention=attention)
        acts[attention] = plan.activation_bytes(s)
    for a in acts.values():
        assert 0 < a["full"] < a["none"]
        assert a["per_layer_none"]["moe"] > 0 and a["per_layer_none"]["dense"] > 0
    assert acts["flash"]["none"] < acts["xla"]["none"]  # no [B,H,T,T] probabilities


def test_activation_bytes_by_hand():
    """tiny (1 dense + 2 MoE layers + 1 MTP block; D=64, routed F=32, K=2) at 8 x 16 tokens over 4
    batch shards: b=2 sequences per device. The module docstring's terms, counted by hand."""
    c = ModelConfig.preset("tiny")
    b, T, D, F, K, P, bf16 = 2, 16, 64, 32, 2, 2, 2
    assert (c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok) == (D, F, K)
    assert (c.num_dense_layers, c.num_moe_layers, c.num_nextn_predict_layers) == (1, 2, 1)
    ep = plan.activation_bytes(plan.make_setup(c, f"data=2,expert={P}", 4, batch=8, seq=T, remat="full"))
    dp = plan.activation_bytes(plan.make_setup(c, "data=4", 4, batch=8, seq=T, remat="full"))
    # a routed row's SwiGLU residuals, bf16: its input [D]; the gate and up outputs [2F] (all
    # that silu(gate) * up keeps for its gradient); silu(gate) * up [F], the down projection's input
    row = (D + 3 * F) * bf16
    extra = (P - 1) * b * T * K * row  # the receive buffer is P x the b*T*K rows a device sends
    assert ep["per_layer_none"]["moe"] - dp["per_layer_none"]["moe"] == extra == 20_480
    assert ep["none"] - dp["none"] == 3 * extra  # 2 stacked MoE layers + the MTP block
    assert dp["per_layer_none"]["dense"] < dp["per_layer_none"]["moe"]
    for a in (ep, dp):  # what "full" keeps besides the recomputed layer: 4 layers' bf16 inputs and more
        assert a["full"] - a["per_layer_none"]["moe"] > 4 * b * T * D * bf16
    assert ep["full"] - dp["full"] == extra  # only the recomputed layer holds a receive buffer

    # One more MoE layer costs "full" exactly its bf16 input [b,T,D]
    deeper = c.replace(num_hidden_layers=c.num_hidden_layers + 1)
    more = plan.activation_bytes(plan.make_setup(deeper, "data=4", 4, batch=8, seq=T, remat="full"))
    assert more["full"] - dp["full"] == b * T * D * bf16


def test_full_remat_keeps_one_layers_weight_copies():
    """Under "full" only the layer being recomputed holds its weight copies: adding the MTP
    block (no larger than a MoE layer) adds its copies under "none" only."""
    copies = {}
    for n in (0, 1):
        c = ModelConfig.preset("tiny", num_nextn_predict_layers=n)
        _, params, _ = plan.abstract_model(c)
        for r in plan.REMATS:
            copies[n, r] = plan.weight_copy_bytes(plan.make_setup(c, "data=1", 1, batch=1, seq=16, remat=r), params)
    assert copies[1, "none"] > copies[0, "none"]
    assert copies[1, "full"] == copies[0, "full"] < copies[0, "none"]


def test_lowers_and_compiles_tiny_with_xla_memory_analysis():
    s = plan.make_setup(ModelConfig.preset("tiny"), "fsdp=2,expert=2,tensor=2", 8, batch=8, seq=32)
    mesh = plan.mesh_for(s)
    m = plan.memory_analysis(plan.lower_train_step(s, mesh).compile())
    got = plan.account(s, activations=False)
    arrays = 3 if s.train_config().mask_documents else 2  # tokens, segment ids (+ positions, read only then)
    batch = arrays * s.local_batch * s.seq * 4  # int32 per device
    assert m["argument"] == got["params"] + got["optimizer"] + 2 * 4 + batch  # + step counters
    assert m["alias"] > 0  # the state is donated


def test_lowers_reduced_depth_671b_on_8_devices():
    config = ModelConfig.preset("v3_671b").replace(num_hidden_layers=2, first_k_dense_replace=1)
    s = plan.make_setup(config, "fsdp=2,expert=4", 8, batch=8, seq=4096)
    text = plan.lower_train_step(s, plan.mesh_for(s)).as_text()
    assert "all_to_all" in text or "all-to-all" in text


def test_tool_lowers_reduced_depth_671b_on_64_devices():
    env = {**os.environ, "XLA_FLAGS": QUICK_COMPILE, "JAX_PLATFORMS": "cpu"}  # the tool adds its --devices
    cmd = [sys.executable, os.path.join(ROOT, "tools", "plan.py"), "--preset", "v3_671b", "--devices", "64",
           "--mesh", "fsdp=8,expert=8", "--layers", "4", "--seq", "4096", "--remat", "full", "--hbm", "h200",
           "--moments", "fp32"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=300).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["lowered"]["layers"] == 4 and r["devices"] == 64
    assert r["parameters"]["main"] == plan.parameter_counts(ModelConfig.preset("v3_671b"))["main"]
    assert math.isclose(r["optimizer"], 2 * r["params"], rel_tol=1e-3)  # fp32 m and v
    assert r["fits"] is False  # 671B needs more than 64 H200s with fp32 Adam (docs/scaling.md)
