"""One mesh, one rules table: from logical axis names to mesh axes, for parameters and activations.

The mesh always has the axes ("data", "fsdp", "expert", "tensor"); unused axes have size 1.
Parameters carry logical names in their `logical_axes` metadata (set where the model creates
them); `RULES` maps each name to mesh axes. The batch is split over data x fsdp x expert;
fsdp also splits the model dimension of the weights (gathered when used), expert splits the
routed experts, tensor splits heads and FFN hidden dimensions.

How the model sees the mesh: run (trace) it inside `with jax.set_mesh(mesh):`. Then activation
constraints apply and the MoE dispatches through `parallel.expert` (shard_map). Outside any
mesh the model is the plain single-device model.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axis (or axes, or None = never split). The one table.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,  # stacked-layer axis (added by nnx.vmap, not in the metadata)
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",  # H*K projection dims (heads outermost, so a split keeps whole heads)
    "mlp": "tensor",  # dense / shared-expert hidden
    "latent": None,  # q / kv low-rank bottlenecks
    "norm": None,  # RMSNorm scales
    "router": None,  # the router's expert scores: every device scores every expert
    "expert": "expert",
    "expert_mlp": "tensor",
    # activations
    "batch": BATCH_AXES,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def _check_rules(rules: dict) -> None:
    for name, axes in rules.items():
        for a in (axes,) if isinstance(axes, str) else axes or ():
            if a not in AXES:
                raise ValueError(f"rule {name!r} -> {axes!r}: {a!r} is not a mesh axis {AXES}")


_check_rules(RULES)


# ---------------------------------------------------------------------------------------------
# mesh


def parse_mesh_spec(spec: str | dict | None, n_devices: int) -> dict[str, int]:
    """'data=2,expert=4' (or a dict) -> sizes of all four axes; one size may be -1 (the rest).

    Axes left out have size 1; None puts every device on data. Raises ValueError naming the
    problem when an axis is unknown or repeated, a size is not an integer, or the sizes do not
    multiply to `n_devices`.
    """
    if spec is None or spec == "" or spec == {}:
        return {"data": n_devices, "fsdp": 1, "expert": 1, "tensor": 1}
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            name, eq, size = part.partition("=")
            if not eq:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not AXIS=SIZE")
            items.append((name.strip(), size.strip()))
    else:
        items = list(spec.items())
    sizes: dict[str, int] = {}
    for name, size in items:
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            if isinstance(size, bool) or not isinstance(size, (int, str)):
                raise TypeError  # int() would truncate 2.5 to 2
            sizes[name] = int(size)
        except (TypeError, ValueError):
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} is {size!r}, not an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be positive or -1")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    sizes = {a: sizes.get(a, 1) for a in AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {n_devices} devices do not split into {known} x the rest")
        sizes[rest[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh spec {spec!r}: {' x '.join(str(sizes[a]) for a in AXES)} = "
                         f"{math.prod(sizes.values())} devices, but there are {n_devices}")
    return sizes


def make_mesh(spec: str | dict | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, expert, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


# ---------------------------------------------------------------------------------------------
# logical names -> shardings


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int]
                    ) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims have logical `names`.

    A dim whose size the mesh axes do not divide stays whole. Two dims resolving to the same
    mesh axis is an error (the table would be inconsistent for this array).
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    spec, used = [], []
    for name, size in zip(names, shape, strict=True):
        if name is not None and name not in RULES:
            raise ValueError(f"logical axis {name!r} has no rule in parallel.mesh.RULES")
        axes = RULES.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
        if size % math.prod(mesh_shape[a] for a in axes):
            axes = ()
        clash = set(axes) & set(used)
        if clash:
            raise ValueError(f"logical axes {tuple(names)} put mesh axes {sorted(clash)} on two dimensions")
        used.extend(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _variable_spec(v: nnx.Variable, mesh_shape: dict[str, int]) -> PartitionSpec:
    """Spec of one variable; leading dims beyond its metadata are stacked-layer axes."""
    shape = tuple(v.shape)
    names = tuple(v.get_metadata().get("logical_axes") or (None,) * len(shape))
    names = ("layers",) * (len(shape) - len(names)) + names
    return logical_to_spec(names, shape, mesh_shape)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_state, mesh: Mesh):
    """The pytree with each variable's value replaced by its NamedSharding.

    Variables without `logical_axes` (the router bias) and bare arrays are replicated. Works on
    anything holding the model's variables, e.g. an optax state of an nnx.State of params
    (`param_shardings(jax.eval_shape(tx.init, params), mesh)`: moments shard like their
    params). The result serves as jit in/out_shardings and for `jax.device_put`.
    """
    mesh_shape = dict(mesh.shape)

    def one(v):
        if _is_variable(v):
            return v.replace(NamedSharding(mesh, _variable_spec(v, mesh_shape)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def abstract_sharded(abstract_state, mesh: Mesh):
    """The pytree's shapes and dtypes as ShapeDtypeStructs carrying `param_shardings`: a restore or
    lowering target laid out over `mesh`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                        param_shardings(abstract_state, mesh))


def flat_shardings(abstract_state, mesh: Mesh) -> dict[str, NamedSharding]:
    """{'moe_layers/mlp/experts/gate_up_proj': NamedSharding, ...}: the converters' flat param paths."""
    pure = nnx.to_pure_dict(param_shardings(abstract_state, mesh))
    return {"/".join(map(str, path)): s for path, s in _flatten(pure)}


def _flatten(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    out = []
    for k, v in tree.items():
        out.extend(_flatten(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])
    return out


def activation_spec(*names: str | None, shape: Sequence[int]) -> PartitionSpec | None:
    """Spec for an activation under the current `jax.set_mesh` mesh; None outside any mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(AXES) or any(
            t == AxisType.Manual for t in mesh.axis_types):
        return None
    return logical_to_spec(names, shape, dict(mesh.shape))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Sharding constraint on activation `x` by logical names; the identity outside a mesh."""
    spec = activation_spec(*names, shape=x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Sharding of a token batch ([B, T] by default; e.g. ndim=3, batch_dim=1 for [A, B, T]
    micro-batches): B over data x fsdp x expert, other dims whole."""
    return NamedSharding(mesh, PartitionSpec(*(BATCH_AXES if d == batch_dim else None for d in range(ndim))))


# ---------------------------------------------------------------------------------------------
# placing arrays


def place(host_array, sharding: NamedSharding, dtype=None) -> jax.Array:
    """A host array (numpy, memmap, or any object with .shape and numpy slicing) -> jax.Array.

    Only the slices this process's devices own are read (`make_array_from_callback`), so a
    tensor never gathers on one device, and each host of a pod reads only its part.
    """
    def piece(index):
        block = np.asarray(host_array[index])
        return block if dtype is None else block.astype(dtype)

    return jax.make_array_from_callback(tuple(host_array.shape), sharding, piece)


def shard_like(host: dict, abstract_state, mesh: Mesh) -> nnx.State:
    """Nested pure dict of host arrays (nnx.to_pure_dict layout) -> state placed by the rules.

    Each leaf is cast to the abstract state's dtype shard by shard; the result merges with the
    model's graphdef: `nnx.merge(graphdef, shard_like(params, abstract_state, mesh))`.
    """
    shardings = param_shardings(abstract_state, mesh)

    def put(v: nnx.Variable, s: nnx.Variable) -> nnx.Variable:
        return v.replace(s.get_value())

    state = jax.tree.map(put, abstract_state, shardings, is_leaf=_is_variable)
    pure_abstract, pure_shardings = nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings)
    placed = jax.tree.map(lambda a, s, x: place(x, s, a.dtype), pure_abstract, pure_shardings, host)
    nnx.replace_by_pure_dict(state, placed)
    return state


def create_sharded(make, mesh: Mesh):
    """Build the nnx module `make()` with every parameter created straight into its sharding.

    Abstract shapes first (nothing allocated), then one jitted init whose out_shardings are the
    rules' shardings: no device ever holds a whole unsharded model.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = param_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def check_fits(config, mesh: Mesh) -> None:
    """Refuse a mesh whose axes do not divide what they split: experts over `expert`, the model
    dimension over `fsdp`, attention heads and FFN hidden sizes over `tensor`. The rules would
    keep such weights whole on every device, a silent fallback that hides the mistake until
    memory runs out. The vocabulary may stay whole (tokenizers have any size), with a warning
    that says how to split it."""
    needs = [("expert", "n_routed_experts"), ("fsdp", "hidden_size"), ("tensor", "num_attention_heads"),
             ("tensor", "moe_intermediate_size")] + [("tensor", "intermediate_size")] * bool(config.num_dense_layers)
    for axis, field in needs:
        if getattr(config, field) % mesh.shape[axis]:
            raise ValueError(f"mesh {axis}={mesh.shape[axis]} must divide {field}={getattr(config, field)}")
    tensor = mesh.shape["tensor"]
    if config.vocab_size % tensor:
        warnings.warn(f"mesh tensor={tensor} does not divide vocab_size={config.vocab_size}: the embedding and the "
                      f"LM head stay whole on every tensor shard; a vocab_size padded to a multiple of {tensor} "
                      "(any size >= the tokenizer's) splits them", stacklevel=2)


def create_model(config, mesh: Mesh, *, seed: int = 0, dtype=None, param_dtype=None, abstract: bool = False):
    """DeepSeekV3(config, rngs=nnx.Rngs(seed), ...) created sharded over `mesh`.

    Same values as the unsharded constructor with the same seed (to an ulp: the init is jitted).
    `abstract`: its variables as ShapeDtypeStructs instead, nothing initialised (a restore target
    once `abstract_sharded` gives them their shardings).
    """
    from dsv3_jax.model import DeepSeekV3  # here, not at the top: the model imports this package

    check_fits(config, mesh)
    kw = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype).items() if v is not None}
    make = lambda: DeepSeekV3(config, rngs=nnx.Rngs(seed), **kw)
    return nnx.eval_shape(make) if abstract else create_sharded(make, mesh)


# ---------------------------------------------------------------------------------------------
# batches and processes


def padded_rows(rows: int, mesh: Mesh | None) -> int:
    """`rows` rounded up to a multiple of the mesh's batch shards (data x fsdp x expert), so a
    batch of them splits evenly; `rows` itself without a mesh."""
    shards = 1 if mesh is None else math.prod(dict(mesh.shape)[a] for a in BATCH_AXES)
    return -(-rows // shards) * shards


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a [global_batch, T] batch this process feeds (a contiguous block)."""
    idx = batch_sharding(mesh).addressable_devices_indices_map((global_batch, 1))
    rows = sorted({r for i in idx.values() for r in range(*i[0].indices(global_batch))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError("this process's batch rows are not contiguous; order the mesh devices by process")
    return slice(rows[0], rows[-1] + 1)


def shard_batch(local: np.ndarray, mesh: Mesh, global_batch: int | None = None, batch_dim: int = 0) -> jax.Array:
    """This process's rows of a batch (`process_rows`; all rows on one process) -> the global
    array sharded by `batch_sharding`. Rows are along `batch_dim`."""
    global_batch = local.shape[batch_dim] * jax.process_count() if global_batch is None else global_batch
    shape = local.shape[:batch_dim] + (global_batch,) + local.shape[batch_dim + 1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim, batch_dim), local, shape)


def add_mesh_arguments(p, default: str) -> None:
    """A command's --mesh and multi-process flags (`start_processes` acts on the latter)."""
    p.add_argument("--mesh", help=f"e.g. data=2,expert=4 (-1: the rest; default: {default})")
    p.add_argument("--coordinator", help="multi-process runs: HOST:PORT of process 0 (TPU pods and "
                   "SLURM/MPI clusters are detected without it)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)


def start_processes(args) -> None:
    """`initialize_distributed` when `add_mesh_arguments`' flags ask for more than one process."""
    if args.coordinator or (args.num_processes or 1) > 1:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def fetch(tree):
    """A pytree of arrays -> their whole values on this host (numpy), gathered from the other
    processes where an array spans them (then a collective: every process must call it). Arrays
    this host holds whole come in one `jax.device_get`, their copies started together."""
    local = lambda x: x.is_fully_addressable or x.is_fully_replicated  # noqa: E731
    if all(local(x) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(x if local(x) else multihost_utils.process_allgather(x, tiled=True)),
                        tree)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, cpu_collectives: str | None = None,
                           **kwargs) -> None:
    """`jax.distributed.initialize` for multi-process runs; a no-op for a single process.

    On TPU pods and SLURM/MPI GPU clusters the arguments are detected; otherwise pass them (or
    set DSV3_COORDINATOR, DSV3_NUM_PROCESSES, DSV3_PROCESS_ID). CPU processes need collectives:
    cpu_collectives="gloo" (the default when num_processes > 1 on CPU). Call before anything
    touches devices.
    """
    coordinator_address = coordinator_address or os.environ.get("DSV3_COORDINATOR")
    if num_processes is None and "DSV3_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["DSV3_NUM_PROCESSES"])
    if process_id is None and "DSV3_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DSV3_PROCESS_ID"])
    if num_processes == 1:
        return
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if cpu_collectives or platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives or "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
