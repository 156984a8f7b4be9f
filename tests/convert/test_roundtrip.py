"""HF -> ours -> HF round trips (fp32, bf16, block FP8, Orbax checkpoint via the CLIs), MTP included."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from convert_testlib import dequantize_reference, hf_logits, load_tensors, make_hf
from safetensors.numpy import save_file
from transformers import DeepseekV3ForCausalLM

from dsv3_jax.convert import convert_hf, load_checkpoint, load_hf, open_params, save_hf
from dsv3_jax.convert.hf import flat_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = np.random.RandomState(0).randint(0, 96, (2, 20)).astype(np.int32)


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_ours_hf_identical(tmp_path, dtype):
    hf = make_hf(tmp_path / "src", seed=3, mtp=True, dtype=getattr(torch, dtype), yarn=True)
    config, model = load_hf(tmp_path / "src", dtype=jnp.float32, param_dtype=jnp.dtype(dtype))
    save_hf(config, model, tmp_path / "out")
    _assert_same_tensors(load_tensors(tmp_path / "src"), load_tensors(tmp_path / "out"))
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager", dtype=hf.dtype)
    np.testing.assert_array_equal(hf_logits(back, TOKENS), hf_logits(hf, TOKENS))
    if dtype == "float32":
        ours = np.asarray(model(jnp.asarray(TOKENS)).logits)
        np.testing.assert_allclose(ours, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_fused_gate_up_holds_each_hf_tensor_in_place(tmp_path):
    """The routed experts' gate_up_proj [L, E, D, 2, F] holds expert e's HF gate_proj (j = 0) and
    up_proj (j = 1) [F, D], transposed, at [l, e, :, j, :], loaded directly or streamed into an
    Orbax checkpoint (one chunk per HF tensor); exporting that checkpoint and loading it back
    gives every param bit for bit."""
    make_hf(tmp_path / "src", seed=6, mtp=True)
    tensors = load_tensors(tmp_path / "src")
    config, model = load_hf(tmp_path / "src")
    convert_hf(tmp_path / "src", tmp_path / "ckpt", param_dtype=jnp.float32)
    _, stored = open_params(tmp_path / "ckpt")
    flat = {k: np.asarray(v) for k, v in flat_params(model).items()}
    E, D, F = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    for path, first in (("moe_layers/mlp/experts/gate_up_proj", config.first_k_dense_replace),
                        ("mtp/layer/mlp/experts/gate_up_proj", config.num_hidden_layers)):
        assert stored[path].store.chunk_layout.read_chunk.shape == (1, 1, D, 1, F)
        for got in (flat[path], stored[path][...]):
            assert got.shape[1:] == (E, D, 2, F)
            for i, e, j in np.ndindex(got.shape[0], E, 2):
                want = tensors[f"model.layers.{first + i}.mlp.experts.{e}.{('gate_proj', 'up_proj')[j]}.weight"]
                np.testing.assert_array_equal(got[i, e, :, j, :], want.T, err_msg=f"{path}[{i}, {e}, :, {j}, :]")
    save_hf(config, stored, tmp_path / "out")  # streaming: each HF tensor read as one chunk of its leaf
    _assert_same_tensors(tensors, load_tensors(tmp_path / "out"))
    _, back = load_hf(tmp_path / "out")
    back = flat_params(back)
    assert back.keys() == flat.keys()
    for k, v in flat.items():
        np.testing.assert_array_equal(np.asarray(back[k]).view(np.uint8), v.view(np.uint8), err_msg=k)


# Dims above 128 so weights have several (and partial edge) 128x128 blocks.
BIG = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=144, kv_lora_rank=136,
           q_lora_rank=160, num_hidden_layers=2)


def test_fp8_export_reproduces_hf_on_dequantized_weights(tmp_path):
    make_hf(tmp_path / "src", seed=4, mtp=True, **BIG)
    config, model = load_hf(tmp_path / "src")
    save_hf(config, model, tmp_path / "fp8", fp8_weights=True, max_shard_size=1 << 20)
    with open(tmp_path / "fp8" / "config.json") as f:
        hf_cfg = json.load(f)
    assert hf_cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert os.path.exists(tmp_path / "fp8" / "model.safetensors.index.json")
    tensors = load_tensors(tmp_path / "fp8")
    fp8_names = {n for n, t in tensors.items() if t.dtype == ml_dtypes.float8_e4m3fn}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in fp8_names
    assert "model.layers.2.self_attn.q_b_proj.weight" in fp8_names  # the MTP layer is quantized too
    for never in ("embed_tokens", "lm_head", "norm", "mlp.gate.", "e_score_correction_bias", "eh_proj",
                  "shared_head.head"):
        assert not [n for n in fp8_names if never in n], never
    assert {n for n in tensors if n.endswith("_scale_inv")} == {n + "_scale_inv" for n in fp8_names}
    # The reference: dequantize independently, hand the result to HF transformers.
    deq = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        deq[name] = dequantize_reference(t, tensors[name + "_scale_inv"]) if name in fp8_names else t
    os.makedirs(tmp_path / "deq")
    save_file(deq, str(tmp_path / "deq" / "model.safetensors"), metadata={"format": "pt"})
    del hf_cfg["quantization_config"]
    with open(tmp_path / "deq" / "config.json", "w") as f:
        json.dump(hf_cfg, f)
    ref_model = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deq", attn_implementation="eager")
    ref = hf_logits(ref_model, TOKENS)
    _, loaded = load_hf(tmp_path / "fp8")
    out = loaded(jnp.asarray(TOKENS))
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=0)
    # The MTP layer survives: it equals the dequantized source's MTP layer.
    _, deq_model = load_hf(tmp_path / "deq")
    np.testing.assert_allclose(np.asarray(out.mtp_logits[0]),
                               np.asarray(deq_model(jnp.asarray(TOKENS)).mtp_logits[0]), atol=1e-5, rtol=0)


def _run(tool, *args):
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *map(str, args)], check=True,
                   cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True)


def test_cli_convert_checkpoint_export(tmp_path):
    hf = make_hf(tmp_path / "src", seed=5, mtp=True)
    _run("convert_hf.py", tmp_path / "src", tmp_path / "ckpt", "--dtype", "float32")
    # transformers' save_pretrained wrote a generation_config.json; it comes along
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "generation_config.json", "params"]
    config, model = load_checkpoint(tmp_path / "ckpt")
    assert config.num_nextn_predict_layers == 1
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS)).logits), hf_logits(hf, TOKENS),
                               atol=1e-4, rtol=0)
    _run("export_hf.py", tmp_path / "ckpt", tmp_path / "out", "--max-shard-size", "20KB")
    files = os.listdir(tmp_path / "out")
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    _assert_same_tensors(load_tensors(tmp_path / "src"), load_tensors(tmp_path / "out"))
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(back, TOKENS), hf_logits(hf, TOKENS))
