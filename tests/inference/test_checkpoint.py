"""Loading a training workdir or a converted checkpoint for inference: any device count or mesh,
only what inference needs, clear errors; generate and eval on a mesh."""

import json
import os
import socket
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from xla_env import xla_flags

from dsv3_jax import parallel
from dsv3_jax.checkpoint.manager import Checkpointer
from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import save_checkpoint
from dsv3_jax.data.tokenizer import eos_id, read_tokenizer, train_tokenizer
from dsv3_jax.eval import bits_per_byte, choice_scores
from dsv3_jax.inference import generate, load_model
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.step import init_state

MODEL = ModelConfig.preset("tiny", num_hidden_layers=2)
MESH = "fsdp=2,expert=2,tensor=2"  # batch split 4 ways
MESH_SHAPE = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
EXPERTS_SPEC = jax.sharding.PartitionSpec(None, "expert", "fsdp", None, "tensor")  # [layers, E, D, 2, F] by the rules
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flat(state) -> dict:
    return {k: np.asarray(v) for k, v in _leaves(state).items()}


def _leaves(state) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")


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


@pytest.fixture(scope="module")
def converted(workdir, tmp_path_factory):
    """The workdir's parameters as a converted checkpoint (config.json + params/) with a tokenizer.json."""
    path = tmp_path_factory.mktemp("converted") / "ckpt"
    save_checkpoint(MODEL, workdir[1], path)
    train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20], 300).save(str(path / "tokenizer.json"))
    return path


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
                   env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1), "PYTHONPATH": ROOT})
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


@pytest.mark.parametrize("source", ["workdir", "converted"])
def test_load_model_onto_a_mesh(source, workdir, converted):
    """Each parameter in the rules' sharding, in `dtype` (the routers' fp32) from either source,
    with the stored values, as on one device."""
    path, saved = (workdir[0] if source == "workdir" else converted), workdir[1]
    mesh = parallel.make_mesh(MESH)
    model, _ = load_model(path, dtype=jnp.bfloat16, mesh=mesh)
    got, single = _leaves(nnx.state(model)), _leaves(nnx.state(load_model(path, dtype=jnp.bfloat16)[0]))
    rules = parallel.flat_shardings(nnx.state(nnx.eval_shape(lambda: DeepSeekV3(MODEL, rngs=nnx.Rngs(0)))), mesh)
    assert got.keys() == saved.keys() == rules.keys()
    assert saved["embed/embedding"].dtype == np.float32  # training's param_dtype
    for k, x in got.items():
        assert x.sharding == rules[k], k
        dtype = jnp.float32 if "/router/" in k else jnp.bfloat16
        assert x.dtype == single[k].dtype == dtype, k
        np.testing.assert_array_equal(np.asarray(x), saved[k].astype(dtype), err_msg=k)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(single[k]), err_msg=k)


def _spy(real, seen: list):
    """`real` recording, per call, the mesh it runs on (its `mesh` argument, else the current
    one), the spec of the routed experts' weights, and its result."""
    def run(model, *args, **kwargs):
        mesh = kwargs.get("mesh") or jax.sharding.get_abstract_mesh()
        out = real(model, *args, **kwargs)
        seen.append((dict(mesh.shape), model.moe_layers.mlp.experts.gate_up_proj[...].sharding.spec, out))
        return out
    return run


def _greedy(model, prompts: list[list[int]], n: int, stop: int) -> list[list[int]]:
    """Greedy continuations by the plain forward over each whole sequence (no cache), one device."""
    forward = nnx.jit(lambda m, tokens: m(tokens).logits)
    seqs, new = [list(p) for p in prompts], [[] for _ in prompts]
    for _ in range(n):
        rows = np.zeros((len(seqs), 16), np.int32)  # right-padded: causal, so padding is never seen
        for r, s in enumerate(seqs):
            rows[r, : len(s)] = s
        logits = np.asarray(forward(model, rows))
        for r, s in enumerate(seqs):
            if stop not in new[r]:
                new[r].append(int(np.argmax(logits[r, len(s) - 1])))
                s.append(new[r][-1])
    return new


PROMPTS = ["the quick brown", "a", "the lazy dog jumps over the"]


@pytest.fixture(scope="module")
def greedy_text(workdir, converted):
    """(tokens, the generate CLI's output) for PROMPTS, 5 new tokens: one device, plain forward."""
    tok = read_tokenizer(str(converted / "tokenizer.json"))
    single, _ = load_model(workdir[0], dtype=jnp.float32)
    want = _greedy(single, [tok.encode(p).ids for p in PROMPTS], 5, eos_id(tok))
    return want, "".join(f"--- {p}\n{tok.decode(t)}\n" for p, t in zip(PROMPTS, want))


def _generate_args(workdir, converted) -> list[str]:
    return (["--ckpt", str(workdir[0]), "--tokenizer", str(converted / "tokenizer.json"), "--max-new-tokens", "5",
             "--dtype", "float32", "--mesh", MESH] + [a for p in PROMPTS for a in ("--prompt", p)])


def test_generate_cli_on_a_mesh_gives_the_one_device_greedy_tokens(workdir, converted, greedy_text, monkeypatch,
                                                                    capsys):
    """--mesh loads the workdir sharded over the 8 devices; its 3 prompts are split over the 4
    batch shards; the greedy tokens are one device's (by the plain forward, no cache)."""
    from dsv3_jax import generate as cli  # noqa: PLC0415

    seen = []
    monkeypatch.setattr(cli, "generate", _spy(generate, seen))
    assert cli.main(_generate_args(workdir, converted)) == 0
    (mesh_shape, experts, result), = seen
    assert (mesh_shape, experts) == (MESH_SHAPE, EXPERTS_SPEC)
    assert result.tokens == greedy_text[0]
    assert capsys.readouterr().out == greedy_text[1]


_PRINT_TO_FILE = ("import runpy, sys; sys.stdout = open(sys.argv.pop(1), 'w', encoding='utf-8', newline=''); "
                  "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def _two_processes(args: list[str], start: str, tmp_path) -> list[str]:
    """`python -m ARGS` in two CPU processes x 4 devices (jax.distributed over loopback, gloo) ->
    what each one prints from the first `start` on ("" without one). Python's stdout goes to a
    file of its own: Gloo writes its connection notes to the process's stdout from its own
    threads, unbuffered, and one can land inside a printed line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(4)}
    files = [tmp_path / f"stdout{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _PRINT_TO_FILE, str(files[i]), *args, "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
             for i in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for err in errs]
    outs = [f.read_bytes().decode() for f in files]  # bytes, decoded here: text mode would turn a "\r" into "\n"
    return [out[out.index(start):] if start in out else "" for out in outs]


def test_generate_and_eval_clis_over_two_processes(workdir, converted, greedy_text, tmp_path):
    """The mesh over two processes: process 0 prints one device's greedy text and bits per byte,
    process 1 nothing."""
    assert _two_processes(["dsv3_jax.generate", *_generate_args(workdir, converted)], "--- ", tmp_path) == [
        greedy_text[1], ""]
    text = tmp_path / "t.txt"
    text.write_text("the lazy dog jumps over the quick brown fox")
    out, other = _two_processes(["dsv3_jax.eval", "bpb", "--ckpt", str(converted), "--text", str(text), "--window",
                                 "32", "--dtype", "float32", "--mesh", MESH], "{", tmp_path)
    tok = read_tokenizer(str(converted / "tokenizer.json"))
    from dsv3_jax.eval.__main__ import text_tokens  # noqa: PLC0415

    want = bits_per_byte(load_model(converted, dtype=jnp.float32)[0],
                         text_tokens(tok, text.read_text(), MODEL.bos_token_id), len(text.read_bytes()), window=32)
    got = json.loads(out)
    np.testing.assert_allclose(got.pop("bits_per_byte"), want.pop("bits_per_byte"), rtol=1e-5)
    np.testing.assert_allclose(got.pop("nats_per_token"), want.pop("nats_per_token"), rtol=1e-5)
    assert (got, other) == (want, "")


def test_eval_cli_scores_on_a_mesh(converted, tmp_path, monkeypatch, capsys):
    """Both subcommands with --mesh score under the mesh, with the sharded model; results as one device's."""
    from dsv3_jax.eval import __main__ as cli  # noqa: PLC0415

    seen = []
    monkeypatch.setattr(cli, "bits_per_byte", _spy(bits_per_byte, seen))
    monkeypatch.setattr(cli, "choice_scores", _spy(choice_scores, seen))
    tok = read_tokenizer(str(converted / "tokenizer.json"))
    single, _ = load_model(converted, dtype=jnp.float32)
    text = tmp_path / "t.txt"
    text.write_text("the lazy dog jumps over the quick brown fox")
    assert cli.main(["bpb", "--ckpt", str(converted), "--text", str(text), "--window", "32", "--dtype", "float32",
                     "--mesh", MESH]) == 0
    want = bits_per_byte(single, cli.text_tokens(tok, text.read_text(), MODEL.bos_token_id), len(text.read_bytes()),
                         window=32)  # rows [8, 32], the choices' shape too: one compile
    got = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(got.pop("bits_per_byte"), want.pop("bits_per_byte"), rtol=1e-5)
    np.testing.assert_allclose(got.pop("nats_per_token"), want.pop("nats_per_token"), rtol=1e-5)
    assert got == want
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": ["fox", "dog"], "answer": 0}) + "\n"
                            for q in ("the quick brown", "the lazy")))
    assert cli.main(["choice", "--ckpt", str(converted), "--data", str(data), "--dtype", "float32",
                     "--mesh", MESH]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == 2
    assert [s[:2] for s in seen] == [(MESH_SHAPE, EXPERTS_SPEC)] * 2
    contexts = [tok.encode(f"Question: {q}\nAnswer:").ids for q in ("the quick brown", "the lazy")]
    conts = [tok.encode(f" {c}", add_special_tokens=False).ids for c in ("fox", "dog")]
    np.testing.assert_allclose(seen[1][2], choice_scores(single, [c for c in contexts for _ in conts],
                                                         conts * len(contexts)), rtol=1e-5)


@pytest.mark.parametrize("mesh, message", [
    ("data=3", "mesh spec 'data=3': 3 x 1 x 1 x 1 = 3 devices, but there are 8"),
    ("tensor=8", "mesh tensor=8 must divide num_attention_heads=4"),
])
def test_generate_and_eval_refuse_a_bad_mesh_before_reading_weights(workdir, converted, monkeypatch, capsys,
                                                                     mesh, message):
    from dsv3_jax import generate as gen_cli  # noqa: PLC0415
    from dsv3_jax.eval import __main__ as eval_cli  # noqa: PLC0415

    def unread(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(Checkpointer, "restore_subset", unread)
    monkeypatch.setattr("dsv3_jax.convert.load_checkpoint", unread)
    tokenizer = str(converted / "tokenizer.json")
    for path in (workdir[0], converted):
        for main, argv in ((gen_cli.main, ["--ckpt", str(path), "--prompt", "hi"]),
                           (eval_cli.main, ["bpb", "--ckpt", str(path), "--text", "t.txt"]),
                           (eval_cli.main, ["choice", "--ckpt", str(path), "--data", "q.jsonl"])):
            assert main(argv + ["--tokenizer", tokenizer, "--mesh", mesh]) == 2
            assert capsys.readouterr().err == f"error: {message}\n"
