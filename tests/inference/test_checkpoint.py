"""Loading a training workdir for inference: any device count, only what inference needs, clear errors."""

import os
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from dsv3_jax import parallel
from dsv3_jax.checkpoint.manager import Checkpointer
from dsv3_jax.config import ModelConfig
from dsv3_jax.data.tokenizer import train_tokenizer
from dsv3_jax.inference import load_model
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.step import init_state

MODEL = ModelConfig.preset("tiny", num_hidden_layers=2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flat(state) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/").items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as training on 8 devices leaves it (fsdp, expert and tensor sharded), no tokenizer."""
    path = tmp_path_factory.mktemp("run")
    mesh = parallel.make_mesh("fsdp=2,expert=2,tensor=2")
    with jax.set_mesh(mesh):
        _, _, state = init_state(MODEL, TrainConfig(), mesh)
    ckpt = Checkpointer(str(path / "checkpoints"))
    ckpt.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()), MODEL, TrainConfig())
    ckpt.close()
    return path, {**_flat(state.params), **_flat(state.bias)}


def test_a_workdir_trained_on_8_devices_loads_on_one(workdir, tmp_path):
    path, saved = workdir
    script = ("import sys, jax, numpy as np; from flax import nnx, traverse_util\n"
              "from dsv3_jax.inference import load_model\n"
              "model, tok = load_model(sys.argv[1], dtype=np.float32)\n"
              "assert tok is None and len(jax.devices()) == 1\n"
              "flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep='/')\n"
              "np.savez(sys.argv[2], **{k.replace('/', '|'): np.asarray(v) for k, v in flat.items()})\n")
    out = tmp_path / "loaded.npz"
    subprocess.run([sys.executable, "-c", script, str(path), str(out)], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT})
    loaded = {k.replace("|", "/"): v for k, v in np.load(out).items()}
    assert loaded.keys() == saved.keys()
    for k in saved:
        np.testing.assert_array_equal(loaded[k], saved[k], err_msg=k)


def test_the_model_sits_on_one_device(workdir):
    model, _ = load_model(workdir[0])
    assert {d for x in jax.tree.leaves(nnx.state(model)) for d in x.devices()} == {jax.devices()[0]}


def test_a_tokenizer_larger_than_the_model_is_refused(workdir, tmp_path):
    tok = train_tokenizer(["the quick brown fox " * 20], 300)
    tok.add_tokens([f"<extra{i}>" for i in range(MODEL.vocab_size)])
    tok.save(str(tmp_path / "big.json"))
    with pytest.raises(ValueError, match=rf"big.json has {tok.get_vocab_size()} tokens, more than the model's "
                                         rf"vocab_size={MODEL.vocab_size}"):
        load_model(workdir[0], tokenizer=str(tmp_path / "big.json"))


def test_workdirs_without_a_usable_checkpoint_are_named(tmp_path, workdir):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty/checkpoints holds no checkpoint"):
        load_model(tmp_path / "empty")
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(workdir[0]), str(broken)], check=True)
    for root, _, files in os.walk(broken / "checkpoints" / "1"):
        for f in files:
            open(os.path.join(root, f), "wb").close()
    with pytest.raises(ValueError, match=r"broken/checkpoints/1: config unreadable"):
        load_model(broken)


def test_generate_and_eval_name_a_missing_tokenizer_before_reading_weights(workdir, tmp_path, monkeypatch, capsys):
    from dsv3_jax import generate  # noqa: PLC0415
    from dsv3_jax.eval import __main__ as evaluate  # noqa: PLC0415

    def unread(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(Checkpointer, "restore_subset", unread)
    monkeypatch.setattr("dsv3_jax.convert.load_checkpoint", unread)
    converted = tmp_path / "converted"  # config.json + params/, no tokenizer
    (converted / "params").mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    for path in (workdir[0], converted):
        for main, argv in ((generate.main, ["--ckpt", str(path), "--prompt", "hi"]),
                           (evaluate.main, ["bpb", "--ckpt", str(path), "--text", "t.txt"])):
            assert main(argv) == 2
            assert capsys.readouterr().err == f"error: {path} has no tokenizer.json; pass --tokenizer\n"
