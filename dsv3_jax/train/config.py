"""TrainConfig: the optimisation recipe (SPEC G) scaled to a run, and `--set section.field=value`."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing

from dsv3_jax import kernels
from dsv3_jax.config import ModelConfig
from dsv3_jax.data.pipeline import DataConfig
from dsv3_jax.fp8 import PRECISIONS
from dsv3_jax.model.transformer import REMATS
from dsv3_jax.parallel.expert import TRANSPORTS

# The paper's token milestones as fractions of its 14.8T-token run (SPEC G).
PAPER_TOKENS = 14.8e12


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # total step target; a rerun with more steps continues
    schedule_steps: int | None = None  # horizon the schedules are scaled to (default: steps)
    grad_accum: int = 1  # micro-batches per step (batch_size is one micro-batch)
    ramp_start_accum: int | None = None  # batch-size ramp: micro-batches per step at the start
    ramp_fraction: float = 469e9 / PAPER_TOKENS  # ramp length, fraction of the run's tokens
    peak_lr: float = 1e-3  # the paper's 2.2e-4 is for 671B; small models take more
    warmup_fraction: float = 0.02
    constant_until: float = 10e12 / PAPER_TOKENS  # then cosine decay
    decay_until: float = 14.3e12 / PAPER_TOKENS  # then the first constant tail
    tail_until: float = 14.633e12 / PAPER_TOKENS  # then the second constant tail
    min_lr_ratio: float = 2.2e-5 / 2.2e-4
    final_lr_ratio: float = 7.3e-6 / 2.2e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1  # not on norm scales (see optimizer.decay_mask)
    clip_norm: float = 1.0
    moments_dtype: str = "bfloat16"  # the paper's AdamW m and v (SPEC F), or "float32"
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_until: float = 10e12 / PAPER_TOKENS
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    bias_gamma_until: float = 14.3e12 / PAPER_TOKENS  # gamma is 0 after this
    dtype: str = "bfloat16"  # compute
    precision: str = "bf16"  # projections: bf16 (the compute dtype), fp8_emulated or fp8_native (SPEC F)
    fp8_pow2_scales: bool = False  # FP8 scales rounded up to powers of two
    attention_impl: str = "auto"  # kernels: "auto" (by backend and mask), "xla", "tokamax", "hopper" or "cudnn"
    grouped_matmul_impl: str = "auto"  # "auto" (by backend), "tokamax", "ragged" or "tiled"
    scaled_matmul_impl: str = "auto"  # fp8_native GEMMs: "auto" (one GPU: "pallas", else "xla"), "xla", "pallas"
    row_gather_impl: str = "auto"  # routed-expert row moves: "auto" (one GPU: "pallas", else "xla"), "xla", "pallas"
    cross_entropy_impl: str = "auto"  # the loss's softmax: "auto" (one GPU: "pallas", else "xla"), "xla", "pallas"
    layer_update_impl: str = "auto"  # optimizer over a layer stack: "auto" (one GPU: "pallas", else "xla"), ...
    expert_layout: str = "auto"  # routed-expert rows: "auto" (= "grouped") or "blocks" (kernels.grouped_matmul)
    expert_transport: str = "auto"  # expert-parallel rows: "auto" (by backend), "ragged", "dense" or "gather"
    expert_capacity_factor: float = 0.0  # dense/gather transports: rows x the balanced share (0: any routing)
    remat: str = "none"  # per-layer rematerialisation: "none", "selective" or "full" (model.remat)
    scan_unroll: int = 0  # layers per layer-scan iteration; 0: by backend (train.step.layers_per_scan)
    param_dtype: str = "float32"  # the weights as stored and read by the forward pass
    master_weights: bool = False  # float32 masters of bfloat16 params, their rest kept (train.step)
    loss_chunk: int = 4096  # tokens per cross-entropy chunk ([chunk, vocab] logits at a time)
    mask_documents: bool = False  # True: attention stays within a packed document (the paper did not: SPEC)
    log_every: int = 0  # 0: every step for runs up to 1000 steps, else every 10
    checkpoint_every: int = 100
    eval_every: int = 0  # steps between held-out evaluations when data.val_paths is set (0: at each checkpoint)
    keep_checkpoints: int = 3
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):  # an int given for a float compiles a different program
            value = getattr(self, f.name)
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise ValueError(f"TrainConfig.{f.name}={value!r}: must be a number")
                object.__setattr__(self, f.name, float(value))
        for f in ("steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "loss_chunk"):
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)}: must be >= 1")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"TrainConfig.schedule_steps={self.schedule_steps}: must be >= 1 (or unset: steps)")
        if self.scan_unroll < 0:
            raise ValueError(f"TrainConfig.scan_unroll={self.scan_unroll}: must be >= 0 (0: by backend)")
        if self.eval_every < 0:
            raise ValueError(f"TrainConfig.eval_every={self.eval_every}: must be >= 0 (0: at each checkpoint)")
        if self.ramp_start_accum is not None and not 1 <= self.ramp_start_accum <= self.grad_accum:
            raise ValueError(f"TrainConfig.ramp_start_accum={self.ramp_start_accum}: must be in [1, grad_accum]")
        if self.moments_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.moments_dtype={self.moments_dtype!r}: float32 or bfloat16")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r}: choose from {', '.join(PRECISIONS)}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in ("float32", "bfloat16"):
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r}: float32 or bfloat16")
        if self.master_weights and self.param_dtype != "bfloat16":
            raise ValueError(f"TrainConfig.master_weights=True keeps float32 masters of bfloat16 params; "
                             f"param_dtype={self.param_dtype!r} needs none (set param_dtype=bfloat16)")
        for f, op in (("attention_impl", "attention"), ("grouped_matmul_impl", "grouped_matmul"),
                      ("scaled_matmul_impl", "scaled_matmul"), ("row_gather_impl", "row_gather"),
                      ("cross_entropy_impl", "cross_entropy"), ("layer_update_impl", "layer_update"),
                      ("expert_layout", "expert_layout")):
            try:
                kernels.validate(op, getattr(self, f))
            except ValueError as e:
                raise ValueError(f"TrainConfig.{f}: {e}") from None
        if self.remat not in REMATS:
            raise ValueError(f"TrainConfig.remat={self.remat!r}: choose from {REMATS}")
        if not 0 <= self.expert_capacity_factor < math.inf:  # NaN fails too
            raise ValueError(f"TrainConfig.expert_capacity_factor={self.expert_capacity_factor}: "
                             "must be finite and >= 0")
        if self.expert_transport not in ("auto",) + TRANSPORTS:
            raise ValueError(f"TrainConfig.expert_transport={self.expert_transport!r}: "
                             f"choose from {('auto',) + TRANSPORTS}")

    @property
    def horizon(self) -> int:
        return self.schedule_steps or self.steps

    @property
    def update_dtype(self) -> str:
        return update_dtype(self.param_dtype, self.master_weights)


def update_dtype(param_dtype: str, master_weights: bool) -> str:
    """The dtype the optimizer's updates accumulate in (and a workdir's most precise weights):
    the masters' (float32) or the params'."""
    return "float32" if master_weights else param_dtype


def _coerce(cls, field: str, text: str):
    hints = typing.get_type_hints(cls)
    if field not in hints:
        names = sorted(f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "hf_keys"))
        raise ValueError(f"unknown config field {cls.__name__}.{field}; known: {', '.join(names)}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # a bare string
    hint = str(hints[field])
    if value is None or "dict" in hint or "tuple" in hint:
        return tuple(value) if isinstance(value, list) else value
    if "bool" in hint and not isinstance(value, bool):
        raise ValueError(f"{cls.__name__}.{field}: expected true/false, got {text!r}")
    if "float" in hint:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{cls.__name__}.{field}: cannot use {text!r} ({hint})")
        return float(value)
    if ("int" in hint and "float" not in hint and not isinstance(value, int)) or (
            hint == "<class 'str'>" and not isinstance(value, str)):
        raise ValueError(f"{cls.__name__}.{field}: cannot use {text!r} ({hint})")
    return value


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """['model.hidden_size=512', 'train.peak_lr=3e-4'] -> {'model': {...}, 'train': {...}}."""
    out: dict[str, dict] = {k: {} for k in SECTIONS}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION in {sorted(SECTIONS)}")
        out[section][field] = _coerce(SECTIONS[section], field, text)
    return out
