"""The pure training step: (state, batch) -> (state, metrics), jitted with donated state.

One step: for each micro-batch, loss = LM CE + lambda * MTP CE + alpha * balance loss and its
gradient (parameters only; the router bias is not differentiated); sum; AdamW on their mean
with the step's learning rate (`optimizer.make_optimizer`: one pass a weight); then
aux-loss-free balancing moves each MoE layer's bias by gamma * sign(mean load - load) using
the load summed over the whole global batch. The model is traced under `train.precision`'s
FP8 recipe (`fp8.use`), if any. A step whose loss or gradient is not finite leaves the state
unchanged and says so in `finite`.

With `train.master_weights` the params are bfloat16 and the state keeps the rest of their
float32 masters (`master_rest`, int16; `optimizer.master_parts`): micro-batches' gradients
add up in float32 and AdamW updates the masters joined from both halves in float32, writing
both halves back. The state holds 4 bytes a weight, as with float32 params, the update's pass
moves as many bytes, and the forward pass reads the weights as stored instead of casting
float32 ones every step (bench step on an H200: 186.6 against 190.9 ms, thirty-seventh
session). A float32 master copy beside bfloat16 params (2 more bytes written a weight) made the
update's pass 3.2 ms slower: no gain.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax import fp8, kernels, parallel
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, RouterBias
from dsv3_jax.model.transformer import full_depth, remat, scan_unroll
from dsv3_jax.train import schedule
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.losses import chunked_cross_entropy, shifted_targets
from dsv3_jax.train.optimizer import Optimizer, global_norm, make_optimizer, master_parts


class TrainState(NamedTuple):
    step: jax.Array  # int32 []
    micro_batches: jax.Array  # int32 [] micro-batches consumed (the schedules' clock)
    params: nnx.State  # nnx.Param leaves
    bias: nnx.State  # RouterBias leaves
    opt_state: optax.OptState
    master_rest: nnx.State | None = None  # train.master_weights: what the params leave of the masters (int16)


def max_violation(load: jax.Array) -> jax.Array:
    """MaxVio per layer: max_i load_i / mean load - 1 (0 = perfectly balanced). load [L,E] -> [L]."""
    mean = load.mean(-1)
    return load.max(-1) / jnp.maximum(mean, 1e-9) - 1


def update_bias(bias: nnx.State, load: jax.Array, gamma, num_moe_layers: int) -> nnx.State:
    """b += gamma * sign(mean(load) - load) per layer; load rows are main MoE layers then MTP."""
    rows = {"moe_layers": load[:num_moe_layers], "mtp": load[num_moe_layers:]}

    def step(path, b):  # b [L,E]
        load_l = rows[path[0].key]
        return b + gamma * jnp.sign(load_l.mean(-1, keepdims=True) - load_l)

    return jax.tree_util.tree_map_with_path(step, bias)


def layers_per_scan(config: ModelConfig, c: TrainConfig) -> int:
    """`c.scan_unroll`, or by backend when 0: every layer unrolled on GPU, where a looped layer's
    weights are slices at a traced index that the GEMMs do not read in place, so each step copied
    them (bench shape on an H200: 37,055 tokens/s and 89.6 GiB looped, 44,442 and 66.7 GiB
    unrolled); one layer per iteration elsewhere (shorter compiles)."""
    if c.scan_unroll:
        return c.scan_unroll
    return full_depth(config) if jax.default_backend() == "gpu" else 1


def make_losses(graphdef, config: ModelConfig, c: TrainConfig):
    """losses(params, bias, micro) -> {"lm_loss", "mtp_loss", "balance_loss", "load", "tokens"}:
    the model on one micro-batch (tokens / segment_ids / positions [B,T]) under the run's
    precision, kernels and attention masking; the LM and MTP losses are means over their tokens."""
    N = config.num_nextn_predict_layers
    recipe = fp8.recipe_for(c.precision, c.fp8_pow2_scales)

    def losses(params, bias, micro):
        model = nnx.merge(graphdef, params, bias)
        tokens, seg = micro["tokens"], micro["segment_ids"]
        B, T = tokens.shape
        with fp8.use(recipe), kernels.use(c.attention_impl, c.grouped_matmul_impl,
                                          scaled_matmul=c.scaled_matmul_impl, expert_layout=c.expert_layout,
                                          row_gather=c.row_gather_impl, cross_entropy=c.cross_entropy_impl), \
                parallel.expert_transport(c.expert_transport, c.expert_capacity_factor), \
                remat(c.remat), scan_unroll(layers_per_scan(config, c)):
            if c.mask_documents:
                out = model(tokens, positions=micro["positions"], segment_ids=seg)
            else:  # one causal stream per row (packing pads only at the end), padding still excluded
                out = model(tokens, token_mask=seg != 0)
        head = model.lm_head.kernel[...]
        dtype = model.lm_head.dtype

        def ce(h, shift):
            targets, valid = shifted_targets(tokens, seg, shift, c.mask_documents)
            with jax.named_scope("loss"):
                return chunked_cross_entropy(h.reshape(B * T, -1), head, targets.reshape(-1), valid.reshape(-1),
                                             chunk=c.loss_chunk, dtype=dtype)

        lm, n_tokens = ce(out.hidden_states, 1)
        mtp = sum(ce(out.mtp_hidden_states[k], k + 2)[0] for k in range(N)) / N if N else jnp.zeros(())
        return {"lm_loss": lm, "mtp_loss": mtp, "balance_loss": out.balance_loss, "load": out.expert_load,
                "tokens": n_tokens}

    return losses


def make_train_step(graphdef, config: ModelConfig, c: TrainConfig, tx: Optimizer,
                    planned_micro_batches: int):
    losses = make_losses(graphdef, config, c)

    def micro_loss(params, bias, micro, lam):
        aux = losses(params, bias, micro)
        return aux["lm_loss"] + lam * aux["mtp_loss"] + c.balance_alpha * aux["balance_loss"], aux

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """batch: tokens / segment_ids / positions, int32 [A, B, T] (A micro-batches)."""
        A = batch["tokens"].shape[0]
        frac = state.micro_batches.astype(jnp.float32) / planned_micro_batches
        lam = schedule.mtp_lambda(c, frac)
        # The bias enters the differentiated arguments only so that nnx sees one trace level;
        # its gradient is identically zero (it only steers top-k) and is dropped.
        grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 1), has_aux=True)

        def accumulate(acc, micro):
            (loss, aux), (grads, _) = grad_fn(state.params, state.bias, micro, lam)
            return jax.tree.map(jnp.add, acc, (loss, aux, grads)), None

        first = jax.tree.map(lambda x: x[0], batch)
        if A == 1:  # the update reads the gradients where the backward wrote them, in its dtype
            (loss, aux), (grads, _) = grad_fn(state.params, state.bias, first, lam)
        else:  # summed in the updates' dtype (float32 with master weights)
            (loss, aux), _ = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
                lambda: grad_fn(state.params, state.bias, first, lam)))
            grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, c.update_dtype)), state.params)
            (loss, aux, grads), _ = jax.lax.scan(accumulate, (loss, aux, grads), batch)
        loss, grad_norm = loss / A, global_norm(grads) / A
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        lr = schedule.learning_rate(c, frac)
        with jax.named_scope("optimizer"), kernels.use(layer_update=c.layer_update_impl):
            params, rest, opt_state = tx.update(state.params, state.master_rest, state.opt_state, grads,
                                                norm=grad_norm, mean_of=A, lr=lr, ok=finite)
        bias = update_bias(state.bias, aux["load"], schedule.bias_gamma(c, frac), config.num_moe_layers)
        keep = lambda new, old: jnp.where(finite, new, old)
        new = TrainState(keep(state.step + 1, state.step), keep(state.micro_batches + A, state.micro_batches),
                         params, jax.tree.map(keep, bias, state.bias), opt_state, rest)
        vio = max_violation(aux["load"])
        metrics = {"loss": loss, "lm_loss": aux["lm_loss"] / A, "mtp_loss": aux["mtp_loss"] / A,
                   "balance_loss": aux["balance_loss"] / A, "lr": lr, "grad_norm": grad_norm,
                   "mtp_lambda": lam, "max_violation": vio.mean(), "max_violation_per_layer": vio,
                   "target_tokens": aux["tokens"], "finite": finite}
        return new, metrics

    return train_step


def jit_eval_step(graphdef, config: ModelConfig, c: TrainConfig, state: TrainState, mesh):
    """eval_step(params, bias, batch [B,T]) -> (mean LM loss, token count) of a held-out batch,
    jitted with the state's parameter shardings and the batch split over the mesh's batch axes."""
    losses = make_losses(graphdef, config, c)

    def eval_step(params, bias, batch):
        out = losses(params, bias, batch)
        return out["lm_loss"], out["tokens"]

    shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.bias))
    return jax.jit(eval_step, in_shardings=(*shardings, parallel.batch_sharding(mesh)))


def _split(weights: nnx.State, like) -> tuple[nnx.State, nnx.State]:
    """Float32 master weights -> (params in the dtypes of `like`, rest): `optimizer.master_parts`."""
    parts = lambda i: jax.tree.map(lambda w, p: master_parts(w, p.dtype)[i], weights, like)
    return parts(0), parts(1)


def _create_model(config: ModelConfig, c: TrainConfig, mesh, abstract: bool = False,
                  param_dtype: str | None = None) -> DeepSeekV3:
    return parallel.create_model(config, mesh, seed=c.seed, dtype=jnp.dtype(c.dtype),
                                 param_dtype=jnp.dtype(param_dtype or c.update_dtype), abstract=abstract)


def _param_values(config: ModelConfig, c: TrainConfig, mesh) -> nnx.State:
    """The params' abstract values: `c.param_dtype`, but the routers' kernels float32 in every model."""
    return nnx.split(_create_model(config, c, mesh, abstract=True, param_dtype=c.param_dtype), nnx.Param, ...)[1]


def init_state(config: ModelConfig, c: TrainConfig, mesh, model: DeepSeekV3 | None = None
               ) -> tuple[nnx.GraphDef, Optimizer, TrainState]:
    """A fresh TrainState sharded over `mesh` (parameters by the rules, optimizer moments like
    their parameters, counters replicated): of `model`'s weights (already sharded so, e.g.
    `inference.checkpoint.load_weights`; in `c.update_dtype`), else of a new model from `c.seed`.
    With master weights those weights are the masters, split into params and their rest.
    Call under `jax.set_mesh(mesh)`."""
    if model is None:
        model = _create_model(config, c, mesh)
    graphdef, weights, bias = nnx.split(model, nnx.Param, RouterBias)
    tx = make_optimizer(c)
    moments = parallel.param_shardings(jax.eval_shape(tx.init, weights), mesh)
    opt_state = jax.jit(tx.init, out_shardings=moments)(weights)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scalar = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)
    if not c.master_weights:
        return graphdef, tx, TrainState(scalar(), scalar(), weights, bias, opt_state)
    like = _param_values(config, c, mesh)
    shardings = parallel.param_shardings(like, mesh)
    params, rest = jax.jit(lambda w: _split(w, like), out_shardings=(shardings, shardings))(weights)
    return graphdef, tx, TrainState(scalar(), scalar(), params, bias, opt_state, rest)


def abstract_state(config: ModelConfig, c: TrainConfig, mesh
                   ) -> tuple[nnx.GraphDef, Optimizer, TrainState]:
    """`init_state`'s graphdef, optimizer and state, the state as ShapeDtypeStructs with the
    shardings `init_state` gives over `mesh`: a restore target, with nothing initialised or
    allocated (a resumed run would otherwise compile and run the random init only to overwrite it).
    A mesh that does not divide the model is refused as by `init_state` (`parallel.check_fits`)."""
    graphdef, weights, bias = nnx.split(_create_model(config, c, mesh, abstract=True), nnx.Param, RouterBias)
    tx = make_optimizer(c)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    params = _param_values(config, c, mesh) if c.master_weights else weights
    rest = parallel.abstract_sharded(jax.eval_shape(lambda w: _split(w, params)[1], weights), mesh) \
        if c.master_weights else None
    return graphdef, tx, TrainState(scalar, scalar, *(parallel.abstract_sharded(t, mesh) for t in (
        params, bias, jax.eval_shape(tx.init, weights))), rest)


# One GPU: the step's kernels launched one by one, not through XLA's command buffers (CUDA graphs),
# which start a step ~2.5 ms later and run it no faster (bench shape on an H200: 182.6 ms a step
# waited for against 185.1, 182.6 against 183.1 in flight). Meshes of more GPUs, not measured,
# keep XLA's default.
GPU_STEP_OPTIONS = {"xla_gpu_enable_command_buffer": ""}


def jit_train_step(graphdef, config: ModelConfig, c: TrainConfig, tx, planned_micro_batches: int, state: TrainState,
                   mesh):
    """`make_train_step` jitted with donated state, the state's shardings in and out, [A,B,T]
    batches split over the mesh's batch axes and the mesh's `compiler_options`."""
    sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(make_train_step(graphdef, config, c, tx, planned_micro_batches), donate_argnums=0,
                   in_shardings=(sharding, parallel.batch_sharding(mesh, ndim=3, batch_dim=1)),
                   out_shardings=(sharding, None),
                   compiler_options=compiler_options(mesh))


def compiler_options(mesh) -> dict | None:
    """GPU_STEP_OPTIONS for a step on one GPU, else None."""
    return GPU_STEP_OPTIONS if jax.default_backend() == "gpu" and mesh.size == 1 else None
