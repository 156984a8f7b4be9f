"""Load a model from either kind of checkpoint directory: with its tokenizer for inference
(`load_model`), or as the weights a new training run starts from (`load_weights`).

- a training workdir: `checkpoints/` (the latest step's parameters and router biases) and
  `tokenizer.json`;
- a converted checkpoint (`convert.save_checkpoint` / `tools/convert_hf.py`): `config.json` and
  `params/`, with the tokenizer passed separately (or a tokenizer.json put beside them).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from tokenizers import Tokenizer

from dsv3_jax import parallel
from dsv3_jax.checkpoint.manager import Checkpointer
from dsv3_jax.config import ModelConfig
from dsv3_jax.data.tokenizer import read_tokenizer
from dsv3_jax.model import DeepSeekV3, RouterBias
from dsv3_jax.train.config import update_dtype
from dsv3_jax.train.optimizer import master_weight


def _latest(ckpt: Checkpointer, workdir: str) -> tuple[int, dict]:
    """(latest step, its stored {"model": HF config, "train": TrainConfig fields})."""
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    return step, ckpt.read_config(step)


def stored_param_dtype(workdir: str | os.PathLike) -> jnp.dtype:
    """The dtype a training workdir's latest checkpoint holds its weights in (float32 for a run
    with master weights: its masters)."""
    workdir = os.path.abspath(os.fspath(workdir))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        train = _latest(ckpt, workdir)[1]["train"]
        return jnp.dtype(update_dtype(train["param_dtype"], train.get("master_weights", False)))
    finally:
        ckpt.close()


def _is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def stored_config(path: str | os.PathLike) -> ModelConfig:
    """The model config of a training workdir's latest checkpoint or of a converted checkpoint."""
    path = os.path.abspath(os.fspath(path))
    if _is_workdir(path):
        ckpt = Checkpointer(os.path.join(path, "checkpoints"))
        try:
            return ModelConfig.from_hf(_latest(ckpt, path)[1]["model"])
        finally:
            ckpt.close()
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params")):
        return ModelConfig.from_hf(path)
    raise FileNotFoundError(f"{path}: neither a training workdir (checkpoints/) nor a converted "
                            "checkpoint (config.json + params/)")


def _from_workdir(workdir: str, dtype, param_dtype, mesh: Mesh) -> DeepSeekV3:
    """The latest step's parameters (cast to `param_dtype`; a run with master weights gives its
    float32 masters, joined from the params and their rest) and router biases, restored
    straight into their shardings over `mesh`, whatever mesh trained them; the optimizer state is
    never read (it is twice the parameters)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        step, saved = _latest(ckpt, workdir)
        config = ModelConfig.from_hf(saved["model"])
        parallel.check_fits(config, mesh)
        master = saved["train"].get("master_weights", False)
        make = lambda p: nnx.eval_shape(lambda: DeepSeekV3(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=p))
        # Orbax casts each stored leaf to its target's dtype on restore; halves are joined as stored
        graphdef, params, bias = nnx.split(make(saved["train"]["param_dtype"] if master else param_dtype),
                                           nnx.Param, RouterBias)
        target = {"params": parallel.abstract_sharded(params, mesh), "bias": parallel.abstract_sharded(bias, mesh)}
        if master:
            rest = lambda p: jax.ShapeDtypeStruct(p.shape, jnp.int16, sharding=p.sharding)
            target["master_rest"] = jax.tree.map(rest, target["params"])
        state = ckpt.restore_subset(step, target)
    finally:
        ckpt.close()
    params = state["params"]
    if master:
        want = nnx.split(make(param_dtype), nnx.Param, ...)[1]
        join = lambda p, rest: jax.tree.map(lambda q, r, w: master_weight(q, r).astype(w.dtype), p, rest, want)
        params = jax.jit(join, out_shardings=parallel.param_shardings(want, mesh))(params, state["master_rest"])
    return nnx.merge(graphdef, params, state["bias"])


def load_weights(path: str | os.PathLike, *, dtype, param_dtype, mesh: Mesh) -> DeepSeekV3:
    """The model of a workdir (its latest step) or of a converted checkpoint, computing in `dtype`
    with its parameters held in `param_dtype` (the routers' kernels and biases fp32 in every model),
    each restored straight into its sharding by `parallel`'s rules over `mesh`. A mesh the model
    does not fit is refused before any weight is read (`parallel.check_fits`)."""
    path = os.path.abspath(os.fspath(path))  # Orbax refuses relative paths
    if _is_workdir(path):
        return _from_workdir(path, dtype, param_dtype, mesh)
    from dsv3_jax.convert import load_checkpoint  # noqa: PLC0415

    parallel.check_fits(stored_config(path), mesh)
    return load_checkpoint(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)[1]


def load_model(path: str | os.PathLike, *, tokenizer: str | None = None, dtype=jnp.bfloat16,
               require_tokenizer: bool = False, mesh: Mesh | None = None) -> tuple[DeepSeekV3, Tokenizer | None]:
    """(model computing in `dtype`, tokenizer or None) from a workdir or a converted checkpoint.

    Parameters are held in `dtype` from either source (a workdir's are cast from training's
    param_dtype), except the routers' kernels and biases, fp32 in every model. Each lands directly
    in its sharding by `parallel`'s rules over `mesh` (default: one device); a mesh whose axes do
    not divide the model is refused as in training (`parallel.check_fits`).

    The tokenizer is `tokenizer` if given, else the directory's tokenizer.json if present; one
    with more tokens than the model's vocabulary is refused. With `require_tokenizer`, a missing
    one is refused before the (long) model load.
    """
    path = os.path.abspath(os.fspath(path))  # Orbax refuses relative paths
    tok_path = tokenizer or os.path.join(path, "tokenizer.json")
    if tokenizer and not os.path.isfile(tokenizer):  # before the (long) model load
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    if require_tokenizer and not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{path} has no tokenizer.json; pass --tokenizer")
    mesh = parallel.make_mesh(None, jax.devices()[:1]) if mesh is None else mesh
    model = load_weights(path, dtype=dtype, param_dtype=dtype, mesh=mesh)
    if not os.path.isfile(tok_path):
        return model, None
    tok = read_tokenizer(tok_path)
    if tok.get_vocab_size() > model.config.vocab_size:  # ids past the embedding would be clamped silently
        raise ValueError(f"{tok_path} has {tok.get_vocab_size()} tokens, more than the model's "
                         f"vocab_size={model.config.vocab_size}: not this model's tokenizer")
    return model, tok
