"""The training loop: restore or initialise, step, log, checkpoint, stop cleanly.

One step is kept in flight: the next step is dispatched (its batch read and placed) before the
last one's metrics are fetched, so the device does not wait for the host between steps (bench
shape on an H200: 191.6-192.0 ms a step against 192.9-195.4 waiting for each). A checkpoint and a
held-out evaluation wait for their own step first, as they need its state.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dsv3_jax import parallel
from dsv3_jax.checkpoint.manager import Checkpointer
from dsv3_jax.config import ModelConfig
from dsv3_jax.data.corpus import embedded_documents
from dsv3_jax.data.pipeline import DataConfig, eval_batches, make_iterator, read_documents
from dsv3_jax.data.tokenizer import load_or_train_tokenizer
from dsv3_jax.inference.checkpoint import load_weights, stored_config
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.train import schedule
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.metrics import MetricsWriter, plot
from dsv3_jax.train.step import abstract_state, init_state, jit_eval_step, jit_train_step


class NonFiniteError(RuntimeError):
    """The loss or gradient stopped being finite; the state was not updated."""


def _differences(stored: ModelConfig, asked: ModelConfig) -> str:
    """'field: stored X, asked Y, ...' over the fields two model configs differ in."""
    return ", ".join(f"{f.name}: stored {getattr(stored, f.name)!r}, asked {getattr(asked, f.name)!r}"
                     for f in dataclasses.fields(ModelConfig)
                     if f.compare and getattr(stored, f.name) != getattr(asked, f.name))


def _resolve_model_config(ckpt: Checkpointer, asked: ModelConfig) -> ModelConfig:
    """A workdir with checkpoints keeps its model: refuse a different one."""
    step = ckpt.latest_step()
    if step is None:
        return asked
    stored = ModelConfig.from_hf(ckpt.read_config(step)["model"])
    if stored != asked:
        raise ValueError(f"{ckpt.directory} holds a run of a different model ({_differences(stored, asked)}); "
                         "use a new --workdir")
    return stored


def _resolve_horizon(ckpt: Checkpointer, tc: TrainConfig) -> TrainConfig:
    """A resumed run keeps the horizon its schedules were planned for, unless schedule_steps is
    given: continuing past it trains at the schedules' final values instead of stretching them
    (which would send the learning rate back up and restart the MTP weight)."""
    step = ckpt.latest_step()
    if step is None or tc.schedule_steps is not None:
        return tc
    stored = ckpt.read_config(step)["train"]
    return dataclasses.replace(tc, schedule_steps=stored.get("schedule_steps") or stored["steps"])


def _check_state_dtypes(ckpt: Checkpointer, tc: TrainConfig) -> None:
    """A workdir keeps its parameter, master-weight and moment dtypes: Orbax would convert the
    stored state to the asked ones on restore, silently rounding float32 to bfloat16 (or widening it)."""
    step = ckpt.latest_step()
    if step is None:
        return
    stored = ckpt.read_config(step)["train"]
    for f in ("param_dtype", "master_weights", "moments_dtype"):
        if stored.get(f, getattr(tc, f)) != getattr(tc, f):  # a field older workdirs lack: nothing to compare
            raise ValueError(f"{ckpt.directory} holds train.{f}={stored[f]} state but train.{f}={getattr(tc, f)} "
                             "was asked; use the stored dtype or a new --workdir")


def _init_tokenizer(init_from: str) -> str:
    """The tokenizer a run started from `init_from`'s weights must use: the one beside them."""
    path = os.path.join(init_from, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{init_from} has no tokenizer.json; pass --tokenizer (the tokenizer its weights "
                                "were trained with: a new one would not match their embedding)")
    return path


def _pretrained(init_from: str, config: ModelConfig, tc: TrainConfig, mesh) -> DeepSeekV3:
    """`init_from`'s weights as a model of `config` in the updates' dtype (float32 masters under
    master weights): its stored config with overrides that keep every parameter's shape and dtype
    (e.g. routed_scaling_factor, rope_scaling)."""
    dtype, param_dtype = jnp.dtype(tc.dtype), jnp.dtype(tc.update_dtype)
    model = load_weights(init_from, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    if model.config == config:
        return model
    asked = nnx.eval_shape(lambda: DeepSeekV3(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))

    def shapes(m):
        return {jax.tree_util.keystr(k): (v.shape, v.dtype) for k, v in jax.tree.leaves_with_path(nnx.state(m))}

    if shapes(asked) != shapes(model):
        raise ValueError(f"{init_from}: the asked model changes the shapes of its parameters "
                         f"({_differences(model.config, config)}); a run started from these weights keeps them")
    return nnx.merge(nnx.graphdef(asked), nnx.state(model))


def _tokenizer(workdir, tokenizer_path, data: DataConfig, model_config: ModelConfig):
    documents = None
    if not tokenizer_path and not os.path.exists(os.path.join(workdir, "tokenizer.json")):
        documents = read_documents(data.paths, data.text_field) if data.paths else embedded_documents()
    tok = load_or_train_tokenizer(tokenizer_path, workdir, documents, model_config.vocab_size)
    if tok.get_vocab_size() > model_config.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size="
                         f"{model_config.vocab_size}; pass --set model.vocab_size={tok.get_vocab_size()}")
    return tok


def _check_token_ids(batches: list[dict], vocab_size: int, where: str) -> None:
    """Pre-tokenized data may hold ids the model has no embedding for (ArrayRecord records)."""
    for m in batches:
        lo, hi = int(m["tokens"].min()), int(m["tokens"].max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{where}: the data holds token id {lo if lo < 0 else hi}, outside the model's "
                             f"vocabulary [0, {vocab_size}) (model.vocab_size)")


def train(workdir: str, model_config: ModelConfig, train_config: TrainConfig, data_config: DataConfig,
          tokenizer_path: str | None = None, progress: bool = True, mesh: str | dict | None = None,
          devices=None, on_log: Callable[[dict], None] | None = None, init_from: str | None = None) -> list[dict]:
    """Train to `train_config.steps` (continuing from workdir's latest checkpoint); returns the
    metrics logged by this call. Always checkpoints the last step it reaches. A workdir already
    at or past that step is left as it is, with a one-line note on stderr.

    `init_from` (a converted checkpoint or a training workdir) starts a new run from its weights
    (parameters and router biases) instead of a random model: fresh optimizer, step counter, data
    and schedules; the tokenizer is the one beside the weights unless `tokenizer_path` is given.
    `model_config` is its stored config (`inference.checkpoint.stored_config`), changed only in
    fields that keep the parameters' shapes. A workdir that already holds a checkpoint resumes it.

    `mesh` is a spec such as "data=2,expert=4" over `devices` (default: all devices, all on
    data); parameters, optimizer state and batches are sharded by `dsv3_jax.parallel`'s rules,
    and each process reads only its share of the data. `on_log(record)` is called with each
    logged record as it is written (e.g. a notebook's live loss plot).
    """
    tc = train_config
    if data_config.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"data.seq_len={data_config.seq_len} exceeds model.max_position_embeddings="
                         f"{model_config.max_position_embeddings}")
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh(mesh, devices)
    shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
    if data_config.batch_size % shards:
        raise ValueError(f"data.batch_size={data_config.batch_size} must be divisible by the mesh's batch "
                         f"shards (data x fsdp x expert = {shards})")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    config = _resolve_model_config(ckpt, model_config)
    tc = _resolve_horizon(ckpt, tc)
    _check_state_dtypes(ckpt, tc)
    if init_from and ckpt.latest_step() is not None:
        init_from = None  # the run started from it goes on from its own checkpoint
    if init_from:
        init_from = os.path.abspath(init_from)
        stored_config(init_from)  # a path that holds no weights is refused before any work
        tokenizer_path = tokenizer_path or _init_tokenizer(init_from)
    tokenizer = _tokenizer(workdir, tokenizer_path, data_config, config)
    data = make_iterator(data_config, tokenizer, jax.process_index(), jax.process_count())
    done = ckpt.latest_step()
    if done is not None and done >= tc.steps:  # before building the state: nothing to compile
        ckpt.close()
        if jax.process_index() == 0:
            print(f"{workdir} is already at step {done}; --steps {tc.steps} asks for nothing more "
                  f"(give --steps above {done} to train further)", file=sys.stderr)
        return []
    val = eval_batches(data_config, tokenizer, jax.process_index(), jax.process_count()) \
        if data_config.val_paths else []
    _check_token_ids(val, config.vocab_size, "data.val_paths")
    val = [{k: parallel.shard_batch(v, mesh, data_config.batch_size) for k, v in b.items()} for b in val]  # once
    with jax.set_mesh(mesh):
        model = _pretrained(init_from, config, tc, mesh) if init_from else None
        return _run(workdir, mesh, ckpt, config, tc, data_config, data, val, progress, on_log, model)


def _evaluate(eval_fn, state, val: list[dict]) -> float:
    """The held-out LM loss: the mean over every scored token of the `val` batches (global
    arrays, placed once)."""
    total, count = 0.0, 0.0
    for b in val:
        loss, n = jax.device_get(eval_fn(state.params, state.bias, b))
        total, count = total + float(loss) * float(n), count + float(n)
    return total / max(count, 1.0)


def _run(workdir, mesh, ckpt, config, tc, data_config, data, val, progress, on_log, model) -> list[dict]:
    start = ckpt.latest_step()
    if start is None:
        graphdef, tx, state = init_state(config, tc, mesh, model)
    else:  # the target's shardings are this run's: a different mesh is fine
        graphdef, tx, target = abstract_state(config, tc, mesh)
        state = ckpt.restore(start, target, data)
    start = int(state.step)
    step_fn = jit_train_step(graphdef, config, tc, tx, schedule.planned_micro_batches(tc), state, mesh)
    eval_fn = jit_eval_step(graphdef, config, tc, state, mesh) if val else None
    eval_every = tc.eval_every or tc.checkpoint_every

    log_every = tc.log_every or (1 if tc.steps <= 1000 else 10)
    writer = MetricsWriter(workdir, start)
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda n, _: stop.update(signal=n)) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=tc.steps, initial=start, unit="step", disable=not progress, dynamic_ncols=True)
    history: list[dict] = []
    held_out = {}  # the last held-out loss, for the progress bar
    step, seen = start, int(state.micro_batches)  # micro-batches consumed, counted here so no step waits
    pending, done_at = None, 0.0  # the step in flight whose metrics are not fetched yet; when the last was

    def fetch(p) -> dict:
        """A dispatched step's record: its metrics fetched (waiting for it to finish); a non-finite
        step stops the run."""
        nonlocal done_at
        at, dispatched, m, tokens, micro_batches = p
        m = jax.device_get(m)
        seconds = time.perf_counter() - max(dispatched, done_at)  # from when the device began it
        done_at = time.perf_counter()
        if not m["finite"]:
            raise NonFiniteError(
                f"step {at}: loss={float(m['loss'])} grad_norm={float(m['grad_norm'])} is not finite; "
                f"the update was skipped and the run stopped. Last checkpoint: "
                f"{'none' if ckpt.latest_step() is None else f'step {ckpt.latest_step()}'} in {ckpt.directory}. "
                "Lower train.peak_lr or check the data.")
        return {"step": at, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0 and k != "finite"},
                "max_violation_per_layer": [float(v) for v in m["max_violation_per_layer"]],
                "tokens_per_sec": float(tokens / seconds), "step_seconds": seconds,
                "tokens_seen": micro_batches * data_config.batch_size * data_config.seq_len}

    def emit(record: dict) -> None:
        if record["step"] % log_every == 0 or record["step"] == tc.steps or "val_lm_loss" in record:
            writer.write(record)
            history.append(record)
            if on_log is not None:
                on_log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}",
                        maxvio=f"{record['max_violation']:.2f}", **held_out)

    try:
        while step < tc.steps and stop["signal"] is None:
            A = schedule.accum_at(tc, step)
            micro = [next(data) for _ in range(A)]
            _check_token_ids(micro, config.vocab_size, f"step {step + 1}")
            batch = {k: parallel.shard_batch(np.stack([m[k] for m in micro]), mesh, data_config.batch_size,
                                             batch_dim=1) for k in micro[0]}  # [A,B,T] global
            state, m = step_fn(state, batch)  # queued behind the step in flight
            step, seen = step + 1, seen + A
            if pending is not None:  # the previous step's metrics, fetched while this one runs
                emit(fetch(pending))
            pending = (step, time.perf_counter(), m, batch["tokens"].size, seen)
            evaluate = eval_fn is not None and (step % eval_every == 0 or step == tc.steps)
            if evaluate or step % tc.checkpoint_every == 0:  # these need this step's state
                record, pending = fetch(pending), None
                if evaluate:
                    record["val_lm_loss"] = _evaluate(eval_fn, state, val)
                    held_out = {"val": f"{record['val_lm_loss']:.3f}"}
                emit(record)
                if step % tc.checkpoint_every == 0:
                    ckpt.save(step, state, data, config, tc)
        if pending is not None:  # the last step, or the step in flight when a signal came
            emit(fetch(pending))
        if ckpt.latest_step() != step:  # the last step reached is always saved
            ckpt.save(step, state, data, config, tc)
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        for s, h in previous.items():
            signal.signal(s, h)
    if stop["signal"] is not None:
        print(f"stopped by signal {signal.Signals(stop['signal']).name} at step {step}; checkpoint saved")
    plot(workdir, config.num_nextn_predict_layers)
    return history
