"""Every PyTorch layout converts to the same params and logits as its HF safetensors twin.

One tiny HF model per dtype (BF16, and block FP8 with slice-aligned scale blocks) is the twin;
the official layout is written from it by a faithful re-slicing (convert_testlib.write_official)
at mp 1, 2 and 4, the PyTorch layouts by torch.save. Malformed inputs raise naming the file.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_testlib import hf_logits, load_tensors, make_hf, model_args, to_torch, write_official
from safetensors.numpy import save_file

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import CheckpointError, detect_layout, load_checkpoint, load_hf, save_hf
from dsv3_jax.convert.hf import flat_params
from dsv3_jax.convert.official import model_args_config
from dsv3_jax.convert.safetensors_io import Reader
from dsv3_jax.convert.torch_io import TorchReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = np.random.RandomState(0).randint(0, 96, (2, 16)).astype(np.int32)
# FP8: every sliced projection dim has 4 scale blocks and divides by 4 (convert.py narrows the
# scales too, so it needs both): H*(nope+rope)=400, H*(nope+v)=432, H*v=400, inter=moe_inter=400.
FP8_DIMS = dict(num_attention_heads=4, num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=92,
                v_head_dim=100, intermediate_size=400, moe_intermediate_size=400)
NO_MTP = "no MTP layer"


class Twin:
    """A HF safetensors directory (with an MTP layer) and what load_hf makes of it."""

    def __init__(self, kind, directory):
        self.kind, self.dir = kind, directory
        self.config, model = load_hf(directory)
        self.params = {k: np.asarray(v) for k, v in flat_params(model).items()}
        self.logits = np.asarray(model(jnp.asarray(TOKENS)).logits)
        with open(os.path.join(directory, "config.json")) as f:
            self.hf_config = json.load(f)

    def check(self, config: ModelConfig, model, mtp: bool = False) -> None:
        """Bit-identical params (the MTP layer's only with `mtp`) and identical logits."""
        assert config.num_nextn_predict_layers == int(mtp)
        flat = {k: np.asarray(v) for k, v in flat_params(model).items()}
        assert sorted(flat) == sorted(k for k in self.params if mtp or not k.startswith("mtp/"))
        for k, v in flat.items():
            np.testing.assert_array_equal(v.view(np.uint8), self.params[k].view(np.uint8), err_msg=k)
        np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS)).logits), self.logits)


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def twin(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "bf16":
        hf = make_hf(d / "hf", seed=11, mtp=True, dtype=torch.bfloat16)
        t = Twin("bf16", d / "hf")
        np.testing.assert_allclose(t.logits, hf_logits(hf.float(), TOKENS), atol=1e-4, rtol=0)
        return t
    make_hf(d / "fp32", seed=12, mtp=True, **FP8_DIMS)
    config, model = load_hf(d / "fp32")
    save_hf(config, model, d / "hf", fp8_weights=True)
    return Twin("fp8", d / "hf")


def _official(twin, directory, mp):
    write_official(twin.dir, directory, mp, twin.config.n_routed_experts, twin.config.num_hidden_layers)
    return directory


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_official_layout(twin, tmp_path, mp):
    src = _official(twin, tmp_path / "off", mp)
    assert detect_layout(src) == "official"
    # The config three ways: config.json beside the weights, a ModelArgs json, a HF config.json path.
    if mp == 1:
        shutil.copy(twin.dir / "config.json", src / "config.json")
        config = None
    elif mp == 2:
        config = tmp_path / "config_tiny.json"
        config.write_text(json.dumps(model_args(twin.hf_config)))
    else:
        config = twin.dir / "config.json"
    with pytest.warns(UserWarning, match=NO_MTP):
        twin.check(*load_hf(src, config=config))


def _torch_layout(twin, directory, kind):
    tensors = {k: to_torch(v) for k, v in load_tensors(twin.dir).items()}
    os.makedirs(directory)
    if kind == "bin":
        torch.save(tensors, directory / "pytorch_model.bin")
    elif kind == "sharded":
        names = sorted(tensors)
        files = {n: f"pytorch_model-0000{1 + i % 2}-of-00002.bin" for i, n in enumerate(names)}
        for f in sorted(set(files.values())):
            torch.save({n: tensors[n] for n in names if files[n] == f}, directory / f)
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    else:  # a training checkpoint: the state dict nested under "state_dict", next to other entries
        torch.save({"state_dict": tensors, "step": 7, "optimizer": {"lr": torch.tensor(0.1)}}, directory / "ckpt.pt")
        return directory / "ckpt.pt"
    shutil.copy(twin.dir / "config.json", directory / "config.json")
    return directory


@pytest.mark.parametrize("kind", ["bin", "sharded", "nested"])
def test_torch_layout(twin, tmp_path, kind):
    src = _torch_layout(twin, tmp_path / "pt", kind)
    assert detect_layout(src) == "torch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, model = load_hf(src, config=twin.dir / "config.json" if kind == "nested" else None)
    messages = " ".join(str(w.message) for w in caught)
    assert "no MTP tensors" not in messages  # the MTP layer came along
    assert ("ignoring ['optimizer', 'step']" in messages) == (kind == "nested")
    twin.check(config, model, mtp=True)


def test_model_args_671b_is_the_released_config():
    released = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
                    n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                    n_limited_groups=4, route_scale=2.5, score_func="sigmoid", q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dtype="fp8")
    assert model_args_config(released) == ModelConfig(num_nextn_predict_layers=0)
    with pytest.raises(CheckpointError, match=r"unknown fields \['hidden'\]"):
        model_args_config({**released, "hidden": 1})


# ---- errors: each names the file or tensor ----

@pytest.fixture(scope="module")
def official_bf16(tmp_path_factory):
    """A BF16 official-layout directory at mp 2, with its HF config.json."""
    d = tmp_path_factory.mktemp("errors")
    make_hf(d / "hf", seed=13, mtp=False, dtype=torch.bfloat16)
    write_official(d / "hf", d / "off", 2, 8, 3)
    shutil.copy(d / "hf" / "config.json", d / "off" / "config.json")
    return d / "off"


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf.py"), *map(str, args)],
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)


def test_cli_official_with_model_args(official_bf16, tmp_path):
    """The CLI detects the layout, takes a ModelArgs json, and matches the library; errors are one line."""
    args = tmp_path / "config_tiny.json"
    args.write_text(json.dumps(model_args(json.loads((official_bf16 / "config.json").read_text()))))
    done = _cli(official_bf16, tmp_path / "ckpt", "--config", args, "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    config, model = load_checkpoint(tmp_path / "ckpt")
    ref_config, ref = _load(official_bf16, config=args)
    assert config == ref_config and config.num_nextn_predict_layers == 0
    for k, v in flat_params(ref).items():
        np.testing.assert_array_equal(np.asarray(flat_params(model)[k]), np.asarray(v), err_msg=k)
    done = _cli(official_bf16, tmp_path / "ckpt2", "--layout", "torch")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no pytorch_model.bin.index.json or pytorch_model.bin" in done.stderr
    done = _cli(official_bf16, tmp_path / "ckpt")  # no traceback for a bad path either
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'ckpt'} exists and is not empty"


@pytest.fixture
def off(official_bf16, tmp_path):
    shutil.copytree(official_bf16, tmp_path / "off")
    return tmp_path / "off"


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file  # noqa: PLC0415
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _load(src, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_hf(src, **kw)


def test_missing_rank_file(off):
    os.remove(off / "model1-mp2.safetensors")
    with pytest.raises(CheckpointError, match=r"model1-mp2\.safetensors: missing \(rank 1 of mp=2\)"):
        _load(off)


def test_mismatched_replica(off):
    def change(t):
        t["layers.0.attn.kv_norm.weight"] = t["layers.0.attn.kv_norm.weight"] + 1
    _rewrite(off / "model1-mp2.safetensors", change)
    with pytest.raises(CheckpointError, match=r"model1-mp2\.safetensors: layers\.0\.attn\.kv_norm\.weight differs "
                                              r"from its replica in .*model0-mp2\.safetensors"):
        _load(off)


def test_expert_on_the_wrong_rank(off):
    def change(t):
        t["layers.1.ffn.experts.5.w2.weight"] = t["layers.1.ffn.experts.1.w2.weight"].clone()
    _rewrite(off / "model0-mp2.safetensors", change)
    with pytest.raises(CheckpointError, match=r"model0-mp2\.safetensors: holds layers\.1\.ffn\.experts\.5\.w2\.weight, "
                                              r"but routed expert 5 belongs on rank 1"):
        _load(off)


def test_unknown_official_name_and_missing_slice(off):
    _rewrite(off / "model1-mp2.safetensors", lambda t: t.pop("layers.2.attn.wo.weight"))
    with pytest.raises(CheckpointError, match=r"model1-mp2\.safetensors: missing layers\.2\.attn\.wo\.weight"):
        _load(off)
    _rewrite(off / "model0-mp2.safetensors", lambda t: t.update({"layers.0.attn.wx.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"model0-mp2\.safetensors: unexpected tensor layers\.0\.attn\.wx\."):
        _load(off)


def test_official_without_config(off):
    os.remove(off / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: missing; pass the model config \(--config\): a HF "
                                              r"config\.json, or DeepSeek's ModelArgs json"):
        _load(off)


def test_unknown_layout(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout; expected .*model\{r\}-mp\{n\}"):
        _load(tmp_path)
    with pytest.raises(CheckpointError, match=r"unknown layout 'gguf'"):
        _load(tmp_path, layout="gguf")


class Custom:
    """Not a tensor: a pickle naming this class must be refused, not executed."""


def test_pickle_that_is_not_a_state_dict(tmp_path, official_bf16):
    shutil.copy(official_bf16 / "config.json", tmp_path / "config.json")
    torch.save({"model.embed_tokens.weight": torch.ones(2), "extra": Custom()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a plain PyTorch state dict; refused to "
                                              r"unpickle it \(weights_only\)"):
        _load(tmp_path)
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a state dict .* got list"):
        _load(tmp_path)
    torch.save({"model.embed_tokens.weight": torch.ones(64)}, tmp_path / "pytorch_model.bin")
    with open(tmp_path / "pytorch_model.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable torch\.save file"):
        _load(tmp_path)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_an_index_naming_a_tensor_no_file_holds(tmp_path, kind):
    """The error names the index file of the checkpoint's own format."""
    index = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}[kind]
    shard = {"safetensors": "model-1.safetensors", "bin": "pytorch_model-1.bin"}[kind]
    if kind == "bin":
        torch.save({"a": torch.ones(2)}, tmp_path / shard)
    else:
        save_file({"a": np.ones(2, np.float32)}, tmp_path / shard)
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": {"a": shard, "b": shard}}))
    with pytest.raises(CheckpointError, match=rf"tensor b: {index} lists it in {shard}, which lacks it"):
        (Reader if kind == "safetensors" else TorchReader)(tmp_path)
