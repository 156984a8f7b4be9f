"""Which implementation each backend-chosen op runs: "auto" (by backend) or forced by name.

`use(...)` sets the choice for everything traced inside it (the train step wraps its loss in
it from `TrainConfig.attention_impl`, `grouped_matmul_impl`, `scaled_matmul_impl`,
`row_gather_impl`, `cross_entropy_impl` and `expert_layout`; its optimizer update in it from
`layer_update_impl`); each op's `default_impl` asks
`forced` first. Read at trace time, like `fp8.use`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib

import jax

_forced: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar("dsv3_kernels", default=())


def validate(op: str, impl: str) -> None:
    """`impl` is "auto" or one of `op`'s implementations (its module's `IMPLS`; the expert
    layout's `grouped_matmul.LAYOUTS`), else a ValueError that lists them."""
    module, names = {"expert_layout": ("grouped_matmul", "LAYOUTS")}.get(op, (op, "IMPLS"))
    impls = getattr(importlib.import_module(f"dsv3_jax.kernels.{module}"), names)
    if impl != "auto" and impl not in impls:
        raise ValueError(f"{op} impl {impl!r}: choose from {('auto',) + impls}")


@contextlib.contextmanager
def use(attention: str = "auto", grouped_matmul: str = "auto", latent_attention: str = "auto",
        scaled_matmul: str = "auto", expert_layout: str = "auto", row_gather: str = "auto",
        cross_entropy: str = "auto", layer_update: str = "auto"):
    """Force kernels (and the routed experts' row layout) by name ("auto" keeps the backend's
    default) while tracing inside."""
    choice = {"attention": attention, "grouped_matmul": grouped_matmul, "latent_attention": latent_attention,
              "scaled_matmul": scaled_matmul, "expert_layout": expert_layout, "row_gather": row_gather,
              "cross_entropy": cross_entropy, "layer_update": layer_update}
    for op, impl in choice.items():
        validate(op, impl)
    token = _forced.set(tuple((op, impl) for op, impl in choice.items() if impl != "auto"))
    try:
        yield
    finally:
        _forced.reset(token)


def one_device() -> bool:
    """Whether what is traced here runs on one device: no mesh, or a mesh of one."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def forced(op: str) -> str | None:
    """The implementation `use` forces for `op`, or None for the backend default."""
    return dict(_forced.get()).get(op)
