"""Scale planning: what each device holds when training or serving a config on a mesh.

Every number comes from the model's own code: parameter and optimizer-state shapes from
`nnx.eval_shape` / `jax.eval_shape(tx.init)`, their per-device shards from `param_shardings`
(the rules table), and activations from the residuals JAX's autodiff saves for the backward
pass of the real loss (`saved_residuals`), traced at the per-device shape. `lower_train_step`
lowers the real jitted, sharded train step on (fake) devices with abstract inputs, so a
sharding mistake fails here, not on the pod. No weights are ever materialised.

Activation model (per device, one micro-batch of b sequences of T tokens):
- "none": everything autodiff saves. Traced once for b=1 and once for b=2 with heads and
  hidden widths divided by the tensor axis (what a tensor-parallel shard computes); the
  difference is the per-sequence cost, so weight-derived residuals (the compute-dtype copies
  of the weights, counted separately) cancel. Expert parallelism over P devices runs the
  routed FFN on a worst-case receive buffer of P x (rows sent) (`parallel.expert`), so the
  routed FFN's per-row residuals are added P - 1 more times.
- "full": traced the same way under the model's own remat "full" (each dense, MoE and MTP
  layer keeps only its input [b,T,D]; embeddings, final norm and the chunked cross-entropy
  keep theirs), plus, while one layer is recomputed in the backward pass, that layer's "none"
  residuals and its weight copies.
Attention is traced with the target's kernel: "xla" (plain einsums, the TPU path, which saves
the [B,H,T,T] probabilities) or "flash" (the [B,H,T,T] terms replaced by a [B,H,T] fp32
logsumexp, what tokamax / FlashAttention-style kernels keep).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals
from jax.sharding import PartitionSpec

from dsv3_jax import fp8, kernels
from dsv3_jax.config import ModelConfig
from dsv3_jax.inference.cache import cache_bytes_per_token
from dsv3_jax.model.transformer import remat
from dsv3_jax.parallel.expert import ExpertRows, expert_ffn
from dsv3_jax.parallel.mesh import BATCH_AXES, _variable_spec, parse_mesh_spec
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.losses import chunked_cross_entropy

GIB = 2 ** 30
REMATS = ("none", "full")
ATTENTION = ("xla", "flash")
# Usable HBM per chip / GPU, GiB.
HARDWARE = {"tpu_v5p": 95.0, "tpu_v6e": 32.0, "h100": 80.0, "h200": 141.0}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One planning question: a model on a mesh, training at batch x seq, serving a decode batch."""

    config: ModelConfig
    mesh: dict  # axis -> size (all four axes)
    batch: int  # global sequences per micro-batch
    seq: int
    accum: int = 1  # micro-batches per step
    precision: str = "bf16"  # bf16 | fp8_emulated | fp8_native
    moments: str = TrainConfig.moments_dtype  # Adam m and v: bfloat16 | float32
    remat: str = "none"
    attention: str = "xla"
    decode_batch: int = 0
    context: int = 0

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def batch_shards(self) -> int:
        return math.prod(self.mesh[a] for a in BATCH_AXES)

    @property
    def local_batch(self) -> int:
        return self.batch // self.batch_shards

    def train_config(self) -> TrainConfig:
        return TrainConfig(grad_accum=self.accum, precision=self.precision, moments_dtype=self.moments)


def make_setup(config: ModelConfig, mesh: str | dict, devices: int, **kw) -> Setup:
    sizes = parse_mesh_spec(mesh, devices)
    s = Setup(config, sizes, **kw)
    if s.batch % s.batch_shards:
        raise ValueError(f"batch {s.batch} does not split over data x fsdp x expert = {s.batch_shards}")
    if s.remat not in REMATS or s.attention not in ATTENTION:
        raise ValueError(f"remat {s.remat!r} / attention {s.attention!r}: choose from {REMATS} / {ATTENTION}")
    return s


# ---------------------------------------------------------------------------------------------
# abstract state and per-device bytes


def abstract_model(config: ModelConfig, param_dtype=jnp.float32):
    """(graphdef, params, router bias) of DeepSeekV3(config), shapes only."""
    from dsv3_jax.model import DeepSeekV3, RouterBias

    model = nnx.eval_shape(lambda: DeepSeekV3(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))
    return nnx.split(model, nnx.Param, RouterBias)


def _shard_elems(shape, spec: PartitionSpec, mesh: dict) -> int:
    n = 1
    for i, size in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        n *= size // math.prod(mesh[a] for a in axes)
    return n


def device_bytes(state, mesh: dict) -> int:
    """Bytes one device holds of an abstract nnx state (or an optax state of one) under RULES.

    Leaves that are not variables (step counters) are replicated.
    """
    total = 0
    for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(leaf, nnx.Variable):
            spec = _variable_spec(leaf, mesh)
            total += _shard_elems(leaf.shape, spec, mesh) * jnp.dtype(leaf.dtype).itemsize
        else:
            total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def parameter_counts(config: ModelConfig) -> dict:
    """Total, MTP and active-per-token parameter counts (SPEC: 671B + MTP, 37B active)."""
    _, params, _ = abstract_model(config)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    total = count(params)
    mtp = count(params["mtp"]) if "mtp" in params else 0
    experts = count(params["moe_layers"]["mlp"]["experts"]) if "moe_layers" in params else 0
    active = total - mtp - experts * (1 - config.num_experts_per_tok / config.n_routed_experts)
    return {"total": total, "main": total - mtp, "mtp": mtp, "active": int(active)}


# ---------------------------------------------------------------------------------------------
# activations from the real code's saved residuals


def target_kernels():
    """Trace with the accelerator's kernels as XLA sees them: lax.ragged_dot experts, XLA attention."""
    return kernels.use(attention="xla", grouped_matmul="ragged")


def _residual_bytes(fn, args, seq: int, attention: str) -> int:
    """Bytes of what autodiff saves for fn(*args). [.., T, T] residuals count only as a layer
    scan's outputs: the others are loop-invariant broadcasts of the mask that XLA fuses away."""
    total = 0
    for aval, where in saved_residuals(fn, *args):
        n = math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
        if len(aval.shape) >= 2 and aval.shape[-2:] == (seq, seq):
            if not where.startswith("output of scan"):
                continue
            if attention == "flash":
                n = math.prod(aval.shape[:-1]) * 4  # a [.., T] fp32 logsumexp instead of [.., T, T]
        total += n
    return total


def local_config(config: ModelConfig, tensor: int) -> ModelConfig:
    """The widths one tensor-parallel shard computes with: heads and hidden sizes / tensor."""
    div = lambda n: n // tensor if n % tensor == 0 else n
    return config.replace(num_attention_heads=div(config.num_attention_heads),
                          num_key_value_heads=div(config.num_key_value_heads),
                          intermediate_size=div(config.intermediate_size),
                          moe_intermediate_size=div(config.moe_intermediate_size))


_TRACED: dict[tuple, int] = {}  # _loss_residuals by its arguments' reprs (a config holds a dict: no hash)


def _loss_residuals(config: ModelConfig, batch: int, seq: int, recipe, attention: str, policy: str = "none") -> int:
    """Residual bytes of the training loss (LM + MTP cross-entropy + balance) at [batch, seq],
    under remat `policy`. Each distinct question is traced once per process: a sweep over
    meshes asks the same ones again (same tensor split, same depth)."""
    key = (repr(config), batch, seq, repr(recipe), attention, policy)
    if key not in _TRACED:
        _TRACED[key] = _trace_loss_residuals(config, batch, seq, recipe, attention, policy)
    return _TRACED[key]


def _trace_loss_residuals(config: ModelConfig, batch: int, seq: int, recipe, attention: str, policy: str) -> int:
    graphdef, params, bias = abstract_model(config)
    tokens = jnp.zeros((batch, seq), jnp.int32)

    def loss(params, bias):  # the bias is an argument only so that nnx sees one trace level
        model = nnx.merge(graphdef, params, bias)
        with fp8.use(recipe):
            out = model(tokens)
        head = model.lm_head.kernel[...]
        ce = lambda h: chunked_cross_entropy(h.reshape(batch * seq, -1), head, tokens.reshape(-1),
                                             jnp.ones((batch * seq,), bool), chunk=TrainConfig.loss_chunk,
                                             dtype=model.lm_head.dtype)[0]
        mtp = sum(ce(h) for h in out.mtp_hidden_states) if out.mtp_hidden_states is not None else 0.0
        return ce(out.hidden_states) + mtp + out.balance_loss

    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    with target_kernels(), remat(policy):
        return _residual_bytes(loss, (abstract(params), abstract(bias)), seq, attention)


def _expert_row_residuals(config: ModelConfig, recipe, n_local_experts: int) -> float:
    """Residual bytes per row of the routed-expert SwiGLU (`parallel.expert.expert_ffn`) under
    the default "grouped" layout (M rows; "blocks" holds E*C + M - C, about twice as many)."""
    D, F = config.hidden_size, config.moe_intermediate_size
    w = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    sizes = jnp.zeros((n_local_experts,), jnp.int32)

    def rows(m):
        def f(xs, gate_up, down):
            with fp8.use(recipe):
                return expert_ffn(ExpertRows(jnp.zeros((n_local_experts, 0, D), xs.dtype), xs, sizes),
                                  gate_up, down).rows

        args = (w(m, D), w(n_local_experts, D, 2, F), w(n_local_experts, F, D))
        with target_kernels():
            return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a, _ in saved_residuals(f, *args))

    return (rows(256) - rows(128)) / 128


def activation_bytes(s: Setup) -> dict:
    """Per-device activation bytes for one micro-batch under `s.remat` (module docstring)."""
    c = s.config
    recipe = fp8.recipe_for(s.precision)
    local = local_config(c, s.mesh["tensor"])
    trace = lambda cfg, b, policy="none": _loss_residuals(cfg, b, s.seq, recipe, s.attention, policy)
    per_seq = trace(local, 2) - trace(local, 1)
    if c.num_moe_layers:
        more = local.replace(num_hidden_layers=c.num_hidden_layers + 1)
        moe_seq = trace(more, 2) - trace(more, 1) - per_seq
    else:
        moe_seq = 0
    if c.num_dense_layers:
        more = local.replace(num_hidden_layers=c.num_hidden_layers + 1,
                             first_k_dense_replace=c.first_k_dense_replace + 1)
        dense_seq = trace(more, 2) - trace(more, 1) - per_seq
    else:
        dense_seq = 0
    P = s.mesh["expert"]
    moe_layers = c.num_moe_layers + c.num_nextn_predict_layers
    ep_row = _expert_row_residuals(local, recipe, max(1, c.n_routed_experts // P)) if P > 1 else 0.0
    ep_seq = (P - 1) * s.seq * c.num_experts_per_tok * ep_row  # worst-case receive buffer, per MoE layer
    b = s.local_batch
    layer_none = {"dense": dense_seq * b, "moe": (moe_seq + ep_seq) * b}
    none = (per_seq + moe_layers * ep_seq) * b
    base = none - c.num_dense_layers * layer_none["dense"] - moe_layers * layer_none["moe"]
    full = (trace(local, 2, "full") - trace(local, 1, "full")) * b + max(layer_none.values())
    return {"none": int(none), "full": int(full), "per_layer_none": {k: int(v) for k, v in layer_none.items()},
            "non_layer": int(base), "chosen": int(none if s.remat == "none" else full)}


def weight_copy_bytes(s: Setup, params) -> int:
    """Compute-dtype (or FP8) copies of the weights autodiff keeps for the backward pass:
    every layer's under remat "none", the largest layer's under "full"."""
    itemsize = 1 if s.precision != "bf16" else 2
    mesh = s.mesh
    per = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        key = getattr(path[0], "key", str(path[0]))
        if len(leaf.shape) < 2 or any(getattr(p, "key", None) == "router" for p in path):
            continue
        size = _shard_elems(leaf.shape, _variable_spec(leaf, mesh), mesh)
        per[key] = per.get(key, 0) + size * (2 if key == "lm_head" else itemsize)
    if s.remat == "none":
        return sum(v for k, v in per.items() if k != "embed")
    layer_sizes = [per[k] / (s.config.num_moe_layers if k == "moe_layers" else s.config.num_dense_layers)
                   for k in ("moe_layers", "dense_layers") if k in per]
    return int(max(layer_sizes, default=0) + per.get("lm_head", 0))


# ---------------------------------------------------------------------------------------------
# communication and serving


def all_to_all_bytes(s: Setup, transport: str = "ragged") -> int:
    """Bytes one device sends over the expert axis per step (the transports of `parallel.expert`).

    "ragged" and "dense": per MoE layer and micro-batch, dispatch and combine forward and their
    transposes backward (4 moves) of its b*T*K routed rows of D values in the compute dtype.
    "ragged" sends only rows for other devices ((P-1)/P of them under uniform routing); "dense"
    sends P-1 full blocks of R rows (fewer with a capacity factor).
    "gather": its b*T tokens to the P-1 others, forward (D bf16 values, K fp32 weights and K int32
    ids) and as the backward's all-gathered cotangent (D bf16); the fp32 partial sums' and the
    input gradient's reduce-scatters send P-1 shares of b*T rows (D fp32 and D bf16 values, K fp32
    weights).
    """
    c, P = s.config, s.mesh["expert"]
    if P == 1:
        return 0
    tokens, D, K = s.local_batch * s.seq, c.hidden_size, c.num_experts_per_tok
    if transport == "gather":
        per_layer = (P - 1) * tokens * (D * (2 + 2 + 4 + 2) + K * (4 + 4 + 4))
    else:
        per_layer = 4 * tokens * K * D * 2 * ((P - 1) / P if transport == "ragged" else (P - 1))
    return int(per_layer * (c.num_moe_layers + c.num_nextn_predict_layers) * s.accum)


def kv_cache_bytes(s: Setup) -> int:
    """Per-device latent cache (SPEC B: 576 bf16 values per token per layer) for
    decode_batch rows of `context` slots, rows split over the batch axes."""
    if not s.decode_batch:
        return 0
    rows = -(-s.decode_batch // s.batch_shards)
    return rows * s.context * cache_bytes_per_token(s.config)


# ---------------------------------------------------------------------------------------------
# the plan


def account(s: Setup, activations: bool = True) -> dict:
    """Per-device bytes of everything training and serving need (see the module docstring)."""
    from dsv3_jax.train.optimizer import make_optimizer

    _, params, bias = abstract_model(s.config)
    tx = make_optimizer(s.train_config())
    opt = jax.eval_shape(tx.init, params)
    param = device_bytes(params, s.mesh) + device_bytes(bias, s.mesh)
    grads = device_bytes(params, s.mesh) * (2 if s.accum > 1 else 1)  # + the accumulator when A > 1
    out = {"devices": s.devices, "mesh": s.mesh, "batch": s.batch, "seq": s.seq, "accum": s.accum,
           "local_batch": s.local_batch, "precision": s.precision, "moments": s.moments, "remat": s.remat,
           "attention": s.attention, "params": param, "optimizer": device_bytes(opt, s.mesh), "gradients": grads,
           "all_to_all_per_step": all_to_all_bytes(s), "kv_cache": kv_cache_bytes(s),
           "decode_batch": s.decode_batch, "context": s.context}
    if activations:
        act = activation_bytes(s)
        out["activations"] = act["chosen"]
        out["activation_detail"] = act
        out["weight_copies"] = weight_copy_bytes(s, params)
    out["train_total"] = sum(out.get(k, 0) for k in ("params", "optimizer", "gradients", "activations",
                                                       "weight_copies"))
    return out


def fits(plan: dict, hbm_gib: float, usable: float = 0.9) -> bool:
    """Training fits when the total is within `usable` of HBM (XLA needs workspace too)."""
    return plan["train_total"] <= hbm_gib * GIB * usable


# ---------------------------------------------------------------------------------------------
# lowering the real step


def lower_train_step(s: Setup, mesh):
    """Lower the real jitted train step (donated, explicit shardings) for abstract inputs."""
    from dsv3_jax.parallel.mesh import batch_sharding
    from dsv3_jax.train.step import abstract_state, make_train_step

    tc = s.train_config()
    graphdef, tx, state = abstract_state(s.config, tc, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    bsh = batch_sharding(mesh, ndim=3, batch_dim=1)
    batch = {k: jax.ShapeDtypeStruct((s.accum, s.batch, s.seq), jnp.int32, sharding=bsh)
             for k in ("tokens", "segment_ids", "positions")}
    step = make_train_step(graphdef, s.config, tc, tx, planned_micro_batches=1000)
    with jax.set_mesh(mesh):
        return jax.jit(step, donate_argnums=0, in_shardings=(state_sharding, bsh),
                       out_shardings=(state_sharding, None)).lower(state, batch)


def memory_analysis(compiled) -> dict:
    """XLA's per-device buffer sizes of a compiled step (bytes)."""
    m = compiled.memory_analysis()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", ""): int(getattr(m, k, 0)) for k in keys}


def mesh_for(s: Setup, devices=None):
    from dsv3_jax.parallel.mesh import make_mesh

    devices = list(jax.devices() if devices is None else devices)[: s.devices]
    if len(devices) < s.devices:
        raise ValueError(f"mesh needs {s.devices} devices, {len(devices)} available "
                         "(set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    return make_mesh(dict(s.mesh), devices)


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:,.2f} MiB"


__all__ = ["ATTENTION", "GIB", "HARDWARE", "REMATS", "Setup", "account",
           "activation_bytes", "all_to_all_bytes", "device_bytes", "fits", "fmt_bytes", "kv_cache_bytes",
           "lower_train_step", "make_setup", "memory_analysis", "mesh_for", "parameter_counts"]
