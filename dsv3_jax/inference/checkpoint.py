"""Load a model (and its tokenizer) for inference from either kind of checkpoint directory.

- a training workdir: `checkpoints/` (the latest step's parameters and router biases) and
  `tokenizer.json`;
- a converted checkpoint (`convert.save_checkpoint` / `tools/convert_hf.py`): `config.json` and
  `params/`, with the tokenizer passed separately.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from tokenizers import Tokenizer

from dsv3_jax.config import ModelConfig
from dsv3_jax.data.tokenizer import read_tokenizer
from dsv3_jax.model import DeepSeekV3, RouterBias


def _from_workdir(workdir: str, dtype) -> tuple[ModelConfig, DeepSeekV3]:
    from dsv3_jax.train.config import TrainConfig  # noqa: PLC0415 (training imports stay optional)
    from dsv3_jax.train.optimizer import make_optimizer  # noqa: PLC0415
    from dsv3_jax.train.step import TrainState  # noqa: PLC0415

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    config = ModelConfig.from_hf(saved["model"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in saved["train"].items() if k in fields})
    model = nnx.eval_shape(lambda: DeepSeekV3(config, rngs=nnx.Rngs(0), dtype=dtype,
                                              param_dtype=jnp.dtype(train.param_dtype)))
    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32), params, bias,
                          jax.eval_shape(make_optimizer(train).init, params))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    manager.close()
    return config, nnx.merge(graphdef, state.params, state.bias)


def load_model(path: str | os.PathLike, *, tokenizer: str | None = None, dtype=jnp.bfloat16
               ) -> tuple[DeepSeekV3, Tokenizer | None]:
    """(model computing in `dtype`, tokenizer or None) from a workdir or a converted checkpoint.

    The tokenizer is `tokenizer` if given, else the directory's tokenizer.json if present.
    """
    path = os.path.abspath(os.fspath(path))  # Orbax refuses relative paths
    if tokenizer and not os.path.isfile(tokenizer):  # before the (long) model load
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        _, model = _from_workdir(path, dtype)
    elif os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params")):
        from dsv3_jax.convert import load_checkpoint  # noqa: PLC0415

        _, model = load_checkpoint(path, dtype=dtype, param_dtype=dtype)
    else:
        raise FileNotFoundError(f"{path}: neither a training workdir (checkpoints/) nor a converted "
                                "checkpoint (config.json + params/)")
    tok_path = tokenizer or os.path.join(path, "tokenizer.json")
    return model, read_tokenizer(tok_path) if os.path.isfile(tok_path) else None
