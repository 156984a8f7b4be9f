"""Every malformed input raises an error naming the tensor or file; no half-written outputs."""

import json
import os
import re
import shutil
import struct
import warnings

import numpy as np
import pytest
from convert_testlib import load_tensors, make_hf
from safetensors.numpy import save_file

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import CheckpointError, convert_hf, hf, load_hf, save_hf
from dsv3_jax.convert.hf import abstract_model, flat_params
from dsv3_jax.convert.names import param_map
from dsv3_jax.convert.safetensors_io import Reader, write_file


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny fp32 HF directory: model.safetensors (3 layers) + model-mtp.safetensors (layer 3)."""
    d = tmp_path_factory.mktemp("base")
    make_hf(d, seed=7, mtp=True)
    return d


@pytest.fixture
def src(base, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(base, d)
    return d


def _edit(directory, file, change):
    """Rewrite one shard with `change(tensors)` applied, keeping the index in step."""
    path = os.path.join(directory, file)
    tensors = load_tensors(directory)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    mine = {n: t for n, t in tensors.items() if index["weight_map"][n] == file}
    change(mine)
    save_file(mine, path, metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file} | {n: file for n in mine}
    with open(index_path, "w") as f:
        json.dump(index, f)


def _edit_config(directory, **changes):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_missing_tensor(src):
    _edit(src, "model.safetensors", lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        load_hf(src)


def test_unexpected_tensor(src):
    _edit(src, "model-mtp.safetensors", lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.extra\.weight"):
        load_hf(src)


@pytest.mark.parametrize("name,shape", [
    ("model.layers.2.self_attn.o_proj.weight", (32, 17)),
    ("model.layers.1.mlp.experts.3.gate_proj.weight", (16, 31)),  # one of a fused leaf's tensors (gate_up_proj)
    ("model.layers.2.mlp.experts.0.up_proj.weight", (32, 16)),  # transposed
])
def test_wrong_shape(src, name, shape):
    _edit(src, "model.safetensors", lambda t: t.update({name: np.ones(shape, np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape(name) + rf" has shape \[{shape[0]}, {shape[1]}\]"):
        load_hf(src)


def test_truncated_file(src):
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_hf(src)


def test_corrupt_header(src):
    path = os.path.join(src, "model-mtp.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{")
    with pytest.raises(CheckpointError, match=r"model-mtp\.safetensors: corrupt safetensors header"):
        load_hf(src)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F8_E5M2", "shape": [2, 2], "data_offsets": [8, 12]},
     r"tensor b has dtype F8_E5M2, which is not supported \(supported: F64, F32"),
    ({"dtype": "U16", "shape": [2], "data_offsets": [8, 12]}, r"tensor b has dtype U16, which is not supported"),
    ({"dtype": 2, "shape": [2], "data_offsets": [8, 12]}, r"corrupt safetensors header entry for tensor b"),
    ({"dtype": "U16", "shape": [-2], "data_offsets": [8, 12]}, r"corrupt safetensors header entry for tensor b"),
])
def test_unsupported_dtype_is_not_a_corrupt_header(tmp_path, entry, message):
    """A file written by hand (8-byte little-endian header length, JSON header, data): a valid
    safetensors dtype we have no numpy type for is named as such; a malformed entry is corrupt."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": entry}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}/model.safetensors: ") + message):
        Reader(tmp_path)


@pytest.mark.parametrize("change, tensor", [
    (dict(hidden_size=48), r"model\.embed_tokens\.weight has shape \[96, 32\], the config needs \[96, 48\]"),
    (dict(num_hidden_layers=2), r"MTP layer model\.layers\.2 is only partly present"),
    (dict(n_routed_experts=4, n_group=2, topk_group=1), r"unexpected tensor model\.layers\.1\.mlp\.experts\.4\."),
])
def test_config_mismatch(src, change, tensor):
    _edit_config(src, **change)
    with pytest.raises(CheckpointError, match=tensor):
        load_hf(src)


def test_partial_mtp(src):
    _edit(src, "model-mtp.safetensors", lambda t: t.pop("model.layers.3.hnorm.weight"))
    with pytest.raises(CheckpointError, match=r"MTP layer model\.layers\.3 is only partly present.*hnorm"):
        load_hf(src)


def test_mtp_copy_mismatch(src):
    def change(t):
        t["model.layers.3.shared_head.head.weight"] = t["model.layers.3.shared_head.head.weight"] + 1
    _edit(src, "model-mtp.safetensors", change)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.shared_head\.head\.weight must be a copy of lm_head"):
        load_hf(src)


def test_hf_written_checkpoint_without_mtp_warns(tmp_path):
    make_hf(tmp_path, seed=8, mtp=False)
    with pytest.warns(UserWarning, match="no MTP tensors.*num_nextn_predict_layers=0"):
        config, model = load_hf(tmp_path)
    assert config.num_nextn_predict_layers == 0


def test_fp8_weight_without_scale(src, tmp_path):
    config, model = load_hf(src)
    path = tmp_path / "fp8"
    save_hf(config, model, path, fp8_weights=True)
    tensors = load_tensors(path)
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]
    os.remove(path / "model.safetensors")
    write_file(str(path / "model.safetensors"),
               [([(n, t.dtype, t.shape)], lambda t=t: [t]) for n, t in tensors.items()])
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is float8_e4m3fn but "
                                              r"model\.layers\.0\.mlp\.up_proj\.weight_scale_inv is missing"):
        load_hf(path)


def test_fp8_export_refuses_a_non_finite_weight(src, tmp_path):
    """An inf would make its block's scale inf and the whole 128x128 block read back as NaN."""
    config, model = load_hf(src)
    flat = {k: np.array(v) for k, v in flat_params(model).items()}
    flat["moe_layers/mlp/experts/gate_up_proj"][0, 2, 5, 1, 3] = np.inf  # [MoE layer, E, D, up, F]; HF: [F, D]
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight\[3, 5\] is inf: "
                                         r"block FP8 cannot store inf or NaN$"):
        save_hf(config, flat, tmp_path / "out" / "hf", fp8_weights=True)
    assert os.listdir(tmp_path / "out") == []


def test_headers_checked_before_anything_is_read(src, tmp_path, monkeypatch):
    """The MTP layer's eh_proj is among the last leaves; its wrong shape is found from the
    headers, before any tensor is read or any output written."""
    bad = {"model.layers.3.eh_proj.weight": np.ones((32, 32), np.float32)}
    _edit(src, "model-mtp.safetensors", lambda t: t.update(bad))
    monkeypatch.setattr(hf, "_read", lambda *a: pytest.fail("a tensor was read before the checks"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.eh_proj\.weight has shape"):
        convert_hf(src, tmp_path / "out" / "ckpt")
    assert not (tmp_path / "out").exists()


def test_integer_weight(src):
    def change(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].astype(np.int8)
    _edit(src, "model.safetensors", change)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight has dtype int8"):
        load_hf(src)


def test_output_through_a_symlink_with_the_tokenizer(src, tmp_path):
    """A symlinked output directory receives the checkpoint (the link stays); the source's
    tokenizer and generation config come along."""
    (src / "tokenizer.json").write_text('{"stand-in": 1}')
    (src / "generation_config.json").write_text('{"bos_token_id": 0}')
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "link")
    convert_hf(src, tmp_path / "link")
    assert os.path.islink(tmp_path / "link")
    assert sorted(os.listdir(tmp_path / "target")) == ["config.json", "generation_config.json", "params",
                                                       "tokenizer.json"]
    assert (tmp_path / "target" / "tokenizer.json").read_text() == '{"stand-in": 1}'


def test_no_half_written_output(src, tmp_path, monkeypatch):
    # Interrupted after 20 source tensors (several leaves written, writes in flight): nothing is left.
    read, count = hf._read, iter(range(20))

    def interrupted(reader, name):
        if next(count, None) is None:
            raise KeyboardInterrupt
        return read(reader, name)

    monkeypatch.setattr(hf, "_read", interrupted)
    out = tmp_path / "out" / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        convert_hf(src, out)
    assert os.listdir(tmp_path / "out") == []
    monkeypatch.undo()  # the export check below reads tensors again
    # Export: a leaf of the wrong shape fails mid-write and leaves nothing either.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, model = load_hf(_fresh(tmp_path))
    flat = {k: np.asarray(v) for k, v in flat_params(model).items()}
    flat["moe_layers/mlp/experts/down_proj"] = flat["moe_layers/mlp/experts/down_proj"][..., :-1]
    with pytest.raises(RuntimeError, match=r"model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight: produced"):
        save_hf(config, flat, tmp_path / "out" / "hf")
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(FileExistsError):
        convert_hf(_fresh(tmp_path, "again"), tmp_path / "src")


def _fresh(tmp_path, name="fresh"):
    d = tmp_path / name
    make_hf(d, seed=9, mtp=True)
    return d


def test_abstract_model_matches_name_map():
    for cfg in (ModelConfig.preset("tiny"), ModelConfig.preset("tiny", q_lora_rank=None, first_k_dense_replace=0,
                                                               num_nextn_predict_layers=2, n_shared_experts=0)):
        _, _, shapes = abstract_model(cfg)
        assert {leaf.param for leaf in param_map(cfg)} == set(shapes)
