"""End-to-end runs of the training loop on the tiny preset (one compile per distinct program)."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from xla_env import xla_flags

from dsv3_jax import parallel
from dsv3_jax.checkpoint.manager import CheckpointCorrupt
from dsv3_jax.config import ModelConfig
from dsv3_jax.data.pipeline import DataConfig
from dsv3_jax.train import loop
from dsv3_jax.train.__main__ import main
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.loop import NonFiniteError, train

MODEL = ModelConfig.preset("tiny", num_hidden_layers=2)
REQUIRED = {"step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_sec",
            "max_violation", "max_violation_per_layer"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = "the model routes every token to a few experts and balances their load with a bias".split()
    rs = np.random.RandomState(0)
    for i in range(20):
        (d / f"{i}.txt").write_text(" ".join(rs.choice(words, 200)) + "\n")
    return DataConfig(paths=(str(d),), seq_len=32, batch_size=8, seed=0)


def _train(workdir, data, mesh=None, **kw):
    """One device unless a mesh over all 8 is asked for (8-way SPMD compiles are slow on 2 cores)."""
    tc = TrainConfig(**{"steps": 16, "schedule_steps": 16, "checkpoint_every": 4, "peak_lr": 3e-3, **kw})
    return train(str(workdir), MODEL, tc, data, progress=False, mesh=mesh,
                 devices=None if mesh else jax.devices()[:1])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, _train(workdir, corpus)


def test_loss_falls_and_everything_is_written(straight):
    workdir, history = straight
    losses = [r["loss"] for r in history]
    assert len(history) == 16 and [r["step"] for r in history] == list(range(1, 17))
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 1.0
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert records == history and REQUIRED <= set(records[0])
    assert len(records[0]["max_violation_per_layer"]) == MODEL.num_moe_layers + MODEL.num_nextn_predict_layers
    assert (workdir / "training.png").stat().st_size > 10_000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "16", "8"]  # keep 3, last step saved


def test_resume_is_exact(tmp_path, corpus, straight, monkeypatch):
    """A resumed run continues the uninterrupted one to the bit, restoring onto a target that
    nothing was initialised for."""
    _, full = straight
    first = _train(tmp_path, corpus, steps=8)
    monkeypatch.setattr(loop, "init_state", lambda *a, **k: pytest.fail("a resumed run initialised a state"))
    second = _train(tmp_path, corpus, steps=16)
    assert [r["step"] for r in second] == list(range(9, 17))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]
    assert [r["max_violation"] for r in first + second] == [r["max_violation"] for r in full]


def test_each_step_is_queued_before_the_last_ones_metrics_are_fetched(tmp_path, corpus, monkeypatch):
    """One step in flight: a step's record is made after the next step was dispatched, except at a
    checkpoint, whose state the loop needs before going on, and the last step, with none after it."""
    dispatched, seen_at_log, jit = [], [], loop.jit_train_step

    def counting(*args, **kw):
        step_fn = jit(*args, **kw)
        return lambda state, batch: dispatched.append(1) or step_fn(state, batch)

    monkeypatch.setattr(loop, "jit_train_step", counting)
    tc = TrainConfig(steps=6, schedule_steps=16, checkpoint_every=3, peak_lr=3e-3)
    train(str(tmp_path), MODEL, tc, corpus, progress=False, devices=jax.devices()[:1],
          on_log=lambda r: seen_at_log.append((r["step"], len(dispatched))))
    assert seen_at_log == [(1, 2), (2, 3), (3, 3), (4, 5), (5, 6), (6, 6)]


def test_restore_onto_a_different_mesh(tmp_path, corpus, straight):
    """A one-device checkpoint continues over three mesh axes and logs the one-device run's losses
    (bf16 compute, so reduction order shows); the model's gradients on more meshes are compared in
    tests/parallel/test_sharded_model.py."""
    workdir, full = straight
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-r", str(workdir), str(moved)], check=True)
    for step in ("12", "16"):
        subprocess.run(["rm", "-r", str(moved / "checkpoints" / step)], check=True)
    resumed = _train(moved, corpus, steps=10, mesh="fsdp=2,expert=2,tensor=2")
    assert [r["step"] for r in resumed] == [9, 10]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in full[8:10]], rtol=2e-3)


def test_batch_must_divide_over_the_mesh(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by the mesh's batch shards .* = 4\)"):
        _train(tmp_path, DataConfig(paths=corpus.paths, seq_len=32, batch_size=6), mesh="data=4,tensor=2")


def test_a_workdir_keeps_its_model(tmp_path, corpus, straight):
    workdir, _ = straight
    with pytest.raises(ValueError, match=r"holds a run of a different model \(hidden_size: stored 64, asked 96\)"):
        train(str(workdir), MODEL.replace(hidden_size=96), TrainConfig(steps=20), corpus, progress=False)


@pytest.mark.parametrize("field, stored, asked", [("param_dtype", "float32", "bfloat16"),
                                                  ("moments_dtype", "bfloat16", "float32")])
def test_a_workdir_keeps_its_state_dtypes(corpus, straight, field, stored, asked):
    """Orbax would restore the stored state in the asked dtype without a word."""
    workdir, _ = straight
    with pytest.raises(ValueError, match=rf"holds train.{field}={stored} state but train.{field}={asked} was asked"):
        train(str(workdir), MODEL, TrainConfig(steps=20, **{field: asked}), corpus, progress=False)


def test_master_weights_run_keeps_and_gives_its_masters(tmp_path, corpus):
    """A run with float32 masters of bfloat16 params keeps the setting, and loading its workdir
    (inference, export, --init-from) restores params and rests and joins them: float32 values
    that bfloat16 does not hold, not the rounded params."""
    from dsv3_jax.inference import load_model  # noqa: PLC0415
    from dsv3_jax.inference.checkpoint import stored_param_dtype  # noqa: PLC0415

    kw = dict(param_dtype="bfloat16", master_weights=True)
    assert [r["step"] for r in _train(tmp_path, corpus, steps=4, **kw)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="holds train.master_weights=True state but train.master_weights=False"):
        _train(tmp_path, corpus, steps=8, param_dtype="bfloat16")
    assert stored_param_dtype(tmp_path) == jnp.float32
    model, _ = load_model(tmp_path, dtype=np.float32)
    kernels = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
               if "router" not in jax.tree_util.keystr(p)]
    assert all(k.dtype == np.float32 for k in kernels)
    assert all((k != k.astype(jnp.bfloat16).astype(np.float32)).any() for k in kernels if k.size > 64)


def test_export_hf_takes_the_workdir(tmp_path, straight):
    """`tools/export_hf.py WORKDIR` writes the latest step's model; it reads back bit for bit."""
    from dsv3_jax.convert import load_hf  # noqa: PLC0415
    from dsv3_jax.convert.hf import flat_params  # noqa: PLC0415
    from dsv3_jax.inference import load_model  # noqa: PLC0415

    workdir, _ = straight
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, os.path.join(root, "tools", "export_hf.py"), str(workdir), str(tmp_path / "hf")],
                   check=True, capture_output=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)})
    model, _ = load_model(workdir, dtype=np.float32)  # the run's param_dtype: what the export keeps
    dtypes = {v["dtype"] for shard in (tmp_path / "hf").glob("*.safetensors")
              for k, v in _safetensors_header(shard).items() if k != "__metadata__"}
    assert dtypes == {"F32"}
    _, exported = load_hf(tmp_path / "hf")
    want, got = flat_params(model), flat_params(exported)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_held_out_loss_is_the_models_loss_on_the_held_out_tokens(tmp_path, corpus):
    """Logged every eval_every steps and at the last; at the last step it is the mean next-token
    NLL of the checkpoint's model over the held-out batches, computed here from its full logits
    (fp32 compute, so the two agree to rounding)."""
    from dsv3_jax.data.pipeline import eval_batches  # noqa: PLC0415
    from dsv3_jax.inference import load_model  # noqa: PLC0415

    held_out = tmp_path / "held_out"
    held_out.mkdir()
    words = "a held out text about routing tokens to experts and keeping their load even".split()
    for i in range(3):
        (held_out / f"{i}.txt").write_text(" ".join(np.random.RandomState(i).choice(words, 150)) + "\n")
    data = dataclasses.replace(corpus, val_paths=(str(held_out),), val_batches=2)
    history = _train(tmp_path / "run", data, steps=5, schedule_steps=5, eval_every=2, dtype="float32")
    assert [r["step"] for r in history if "val_lm_loss" in r] == [2, 4, 5]
    model, tok = load_model(tmp_path / "run", dtype=np.float32)
    forward = nnx.jit(lambda model, tokens, mask: model(tokens, token_mask=mask).logits)  # op by op: slower
    nll, count = 0.0, 0
    for b in eval_batches(data, tok):
        seg = b["segment_ids"]
        logits = np.asarray(forward(model, jnp.asarray(b["tokens"]), jnp.asarray(seg != 0)), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        picked = np.take_along_axis(logp[:, :-1], b["tokens"][:, 1:, None], -1)[..., 0]
        valid = (seg[:, :-1] != 0) & (seg[:, 1:] != 0)
        nll, count = nll - picked[valid].sum(), count + valid.sum()
    np.testing.assert_allclose(history[-1]["val_lm_loss"], nll / count, rtol=2e-5)


def test_a_new_run_starts_from_pretrained_weights(tmp_path, capsys, corpus, straight):
    """`--init-from` a workdir (through the CLI), and the API from the converted checkpoint of the
    same weights with an override that keeps their shapes. With the learning rate and the bias
    step at 0, one step leaves every parameter and router bias as the source holds it (a random
    model would not be); each run counts from step 1 and keeps the source's tokenizer."""
    from dsv3_jax.convert import save_checkpoint  # noqa: PLC0415
    from dsv3_jax.convert.hf import flat_params  # noqa: PLC0415
    from dsv3_jax.inference import load_model  # noqa: PLC0415
    from dsv3_jax.inference.checkpoint import stored_config  # noqa: PLC0415

    source, _ = straight
    want, _ = load_model(source, dtype=np.float32)  # the run's param_dtype
    converted = tmp_path / "converted"
    save_checkpoint(MODEL, want, converted)
    shutil.copy(source / "tokenizer.json", converted / "tokenizer.json")
    cli = ["--init-from", str(source), "--workdir", str(tmp_path / "a"), "--no-progress", "--data", *corpus.paths,
           "--seq-len", "32", "--batch-size", "8", "--set", "train.peak_lr=0", "--set", "train.bias_gamma=0",
           "--val-data", *corpus.paths, "--set", "data.val_batches=1"]
    assert main([*cli, "--steps", "1"]) == 0
    # an override that keeps the shapes (and, as it only draws initial weights, the compiled step:
    # on the CLI's mesh, all devices on data, the step compiled above is reused)
    history = train(str(tmp_path / "b"), MODEL.replace(initializer_range=0.05),
                    TrainConfig(steps=1, peak_lr=0.0, bias_gamma=0.0), corpus, progress=False, init_from=str(converted))
    assert [r["step"] for r in history] == [1]
    assert stored_config(tmp_path / "b").initializer_range == 0.05
    for run in ("a", "b"):
        got, _ = load_model(tmp_path / run, dtype=np.float32)
        assert flat_params(got).keys() == flat_params(want).keys()
        for k, v in flat_params(want).items():
            np.testing.assert_array_equal(np.asarray(flat_params(got)[k]), np.asarray(v), err_msg=f"{run}: {k}")
        assert (tmp_path / run / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
        assert json.loads((tmp_path / run / "metrics.jsonl").read_text())["step"] == 1
    assert main([*cli, "--steps", "2"]) == 0  # the same command again goes on from the run's own checkpoint
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all("val_lm_loss" in r for r in records)  # last steps
    assert f"held-out LM loss {records[-1]['val_lm_loss']:.3f}" in capsys.readouterr().out


def test_init_from_lands_in_a_mesh_that_splits_the_parameters(tmp_path, monkeypatch, corpus, straight):
    """`--init-from` a one-device run's workdir onto fsdp x expert x tensor: each parameter and
    router bias is restored straight into its rule sharding (the routed experts split 8 ways, not
    whole on every device) and, with the learning rate and the bias step at 0, one step leaves
    every value as the source holds it. The data-parallel test above splits no parameter."""
    from dsv3_jax.convert.hf import flat_params  # noqa: PLC0415
    from dsv3_jax.inference import load_model  # noqa: PLC0415

    source, _ = straight
    mesh = "fsdp=2,expert=2,tensor=2"
    loaded = []
    pretrained = loop._pretrained
    monkeypatch.setattr(loop, "_pretrained", lambda *a: loaded.append(pretrained(*a)) or loaded[-1])
    assert main(["--init-from", str(source), "--workdir", str(tmp_path), "--no-progress", "--data", *corpus.paths,
                 "--seq-len", "32", "--batch-size", "8", "--set", "train.peak_lr=0", "--set", "train.bias_gamma=0",
                 "--mesh", mesh, "--steps", "1"]) == 0
    (model,) = loaded
    rules = parallel.flat_shardings(nnx.state(model), parallel.make_mesh(mesh))
    got = flat_params(model)  # the step donated these arrays: their shardings remain
    assert got.keys() == rules.keys()
    for k, v in got.items():
        assert v.sharding.is_equivalent_to(rules[k], v.ndim), f"{k}: {v.sharding.spec}, rule {rules[k].spec}"
    experts = got["moe_layers/mlp/experts/gate_up_proj"]  # [layers, experts, hidden, gate|up, moe hidden]
    assert experts.shape == (1, 8, 64, 2, 32) and experts.sharding.shard_shape(experts.shape) == (1, 4, 32, 2, 16)
    want, after = (flat_params(load_model(d, dtype=np.float32)[0]) for d in (source, tmp_path))  # one device
    assert after.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(v), err_msg=k)


def test_init_from_refuses_what_does_not_fit(tmp_path, corpus, straight):
    source, _ = straight
    bare = tmp_path / "bare"  # the run's weights without its tokenizer
    bare.mkdir()
    shutil.copytree(source / "checkpoints", bare / "checkpoints")
    run = dict(progress=False, devices=jax.devices()[:1])
    with pytest.raises(FileNotFoundError, match=r"bare has no tokenizer.json; pass --tokenizer"):
        train(str(tmp_path / "a"), MODEL, TrainConfig(steps=1), corpus, init_from=str(bare), **run)
    with pytest.raises(ValueError, match=r"changes the shapes of its parameters \(hidden_size: stored 64, asked 96\)"):
        train(str(tmp_path / "b"), MODEL.replace(hidden_size=96), TrainConfig(steps=1), corpus,
              init_from=str(source), **run)
    with pytest.raises(FileNotFoundError, match=r"neither a training workdir \(checkpoints/\) nor a converted"):
        train(str(tmp_path / "c"), MODEL, TrainConfig(steps=1), corpus, init_from=str(tmp_path), **run)


def _safetensors_header(path) -> dict:
    """The JSON header of a safetensors file (its layout: an 8-byte little-endian length, then it)."""
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def test_corrupt_checkpoint_is_reported(tmp_path, corpus, straight):
    workdir, _ = straight
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(workdir), str(broken)], check=True)
    for root, _, files in os.walk(broken / "checkpoints" / "16" / "state"):
        for f in files:
            if f != "_CHECKPOINT_METADATA":
                open(os.path.join(root, f), "wb").close()
    with pytest.raises(CheckpointCorrupt, match=r"checkpoints/16 cannot be restored"):
        _train(broken, corpus, steps=20)


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, corpus):
    _train(tmp_path, corpus, steps=4)
    with pytest.raises(NonFiniteError, match=r"step [5-9]: .* is not finite.*Last checkpoint: step 4"):
        _train(tmp_path, corpus, steps=30, peak_lr=1e12, warmup_fraction=0.0, clip_norm=1e30)
    assert os.listdir(tmp_path / "checkpoints") == ["4"]
    assert [r["step"] for r in _train(tmp_path, corpus, steps=6)] == [5, 6]  # and it resumes from there


def _cli(*args):
    return [sys.executable, "-m", "dsv3_jax.train", "--preset", "tiny", "--no-progress", *args]


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus):
    """The model is the smallest that trains (one dense layer, no MTP): most of this test is the
    process compiling its step (14 s against 23 s for the two-layer model, alone on 2 cores)."""
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "XLA_FLAGS": xla_flags(1)}
    proc = subprocess.Popen(_cli("--workdir", str(workdir), "--steps", "100000", "--data", *corpus.paths,
                                 "--seq-len", "32", "--batch-size", "8", "--set", "model.num_hidden_layers=1",
                                 "--set", "model.num_nextn_predict_layers=0",
                                 "--set", "train.checkpoint_every=100000"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal SIGTERM" in out
    steps = os.listdir(workdir / "checkpoints")
    assert len(steps) == 1 and int(steps[0]) >= 3


def test_a_run_already_at_its_steps_says_so(tmp_path, corpus, straight):
    """--steps at or below the checkpoint's step: a note naming both, status 0, the workdir untouched."""
    workdir = tmp_path / "done"
    subprocess.run(["cp", "-r", str(straight[0]), str(workdir)], check=True)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    for steps in (16, 8):
        r = subprocess.run(_cli("--workdir", str(workdir), "--steps", str(steps), "--data", *corpus.paths,
                                "--seq-len", "32", "--batch-size", "8", "--set", "model.num_hidden_layers=2"),
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.getcwd(), "XLA_FLAGS": xla_flags(1)})
        assert r.returncode == 0, r.stderr
        assert (f"{workdir} is already at step 16; --steps {steps} asks for nothing more "
                "(give --steps above 16 to train further)") in r.stderr, r.stderr
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


@pytest.mark.parametrize("args, message", [
    (["--set", "model.hiddn_size=3"], "unknown config field ModelConfig.hiddn_size"),
    (["--set", "train.peak_lr"], "expected SECTION.FIELD=VALUE"),
    (["--set", "train.steps=abc"], "TrainConfig.steps: cannot use 'abc'"),
    (["--set", "train.peak_lr=abc"], "TrainConfig.peak_lr: cannot use 'abc'"),
    (["--data"], "argument --data: expected at least one argument"),  # not the embedded corpus
    (["--data", "/nonexistent/file.txt"], "data path not found: /nonexistent/file.txt"),
    (["--set", "model.n_group=3"], "ModelConfig.n_group=3"),
    (["--init-from", "/nonexistent/run"], "--init-from takes the model from the checkpoint; drop --preset"),
    (["--set", "train.eval_every=-1"], "TrainConfig.eval_every=-1: must be >= 0"),
    (["--val-data", "/nonexistent/held_out.txt"], "data path not found: /nonexistent/held_out.txt"),
])
def test_cli_errors_are_clear(tmp_path, capsys, args, message):
    """In this process: each error comes before any device work."""
    try:
        code = main(["--preset", "tiny", "--no-progress", "--workdir", str(tmp_path / "w"), "--steps", "1", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_resumed_runs_keep_their_schedule_horizon(tmp_path):
    """Continuing with a larger --steps keeps the stored horizon (no second warmup); an
    explicit schedule_steps, or a fresh workdir, plans its own."""
    from dsv3_jax.train.loop import _resolve_horizon  # noqa: PLC0415

    class Stored:
        def __init__(self, step, train):
            self.step, self.train = step, train

        def latest_step(self):
            return self.step

        def read_config(self, step):
            return {"train": self.train}

    tc = TrainConfig(steps=400)
    assert _resolve_horizon(Stored(200, {"steps": 200, "schedule_steps": None}), tc).horizon == 200
    assert _resolve_horizon(Stored(200, {"steps": 200, "schedule_steps": 1000}), tc).horizon == 1000
    assert _resolve_horizon(Stored(200, {"steps": 200}), TrainConfig(steps=400, schedule_steps=600)).horizon == 600
    assert _resolve_horizon(Stored(None, {}), tc).horizon == 400
    with pytest.raises(ValueError, match="schedule_steps=-5"):
        TrainConfig(schedule_steps=-5)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_expert_capacity_factor_must_be_finite_and_non_negative(value):
    """Refused when the config is made, not later when a run enters the expert transport."""
    with pytest.raises(ValueError, match=f"TrainConfig.expert_capacity_factor={value}: must be finite and >= 0"):
        TrainConfig(expert_capacity_factor=value)


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path):
    """A crash after step 5 with the last checkpoint at step 3: the resumed run logs 4 and 5 again."""
    from dsv3_jax.train.metrics import MetricsWriter, read_metrics  # noqa: PLC0415

    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write({"step": step, "loss": 1.0 / step})
    writer.close()
    MetricsWriter(str(tmp_path), start=3).close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_data_must_fit_the_model(tmp_path, corpus):
    from dsv3_jax.train.loop import _check_token_ids  # noqa: PLC0415

    with pytest.raises(ValueError, match="seq_len=512 exceeds model.max_position_embeddings=256"):
        train(str(tmp_path), MODEL, TrainConfig(steps=1), DataConfig(seq_len=512), progress=False)
    assert not os.path.exists(tmp_path / "checkpoints")
    ok = {"tokens": np.array([[0, 5, MODEL.vocab_size - 1]])}
    _check_token_ids([ok], MODEL.vocab_size, "step 1")
    for bad in (MODEL.vocab_size, -1):  # e.g. pre-tokenized ArrayRecord data of another tokenizer
        with pytest.raises(ValueError, match=f"step 3: the data holds token id {bad}, outside"):
            _check_token_ids([ok, {"tokens": np.array([[1, bad]])}], MODEL.vocab_size, "step 3")
