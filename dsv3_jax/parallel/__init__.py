"""Sharding and expert parallelism: the mesh, the logical-axis rules, sharded init and placement."""

from dsv3_jax.parallel.expert import choose_transport, expert_transport, routed_experts
from dsv3_jax.parallel.mesh import (
                                    AXES,
                                    BATCH_AXES,
                                    RULES,
                                    abstract_sharded,
                                    add_mesh_arguments,
                                    batch_sharding,
                                    check_fits,
                                    constrain,
                                    create_model,
                                    create_sharded,
                                    fetch,
                                    flat_shardings,
                                    initialize_distributed,
                                    logical_to_spec,
                                    make_mesh,
                                    param_shardings,
                                    parse_mesh_spec,
                                    place,
                                    process_rows,
                                    shard_batch,
                                    shard_like,
                                    start_processes,
)

__all__ = ["AXES", "BATCH_AXES", "RULES", "abstract_sharded", "add_mesh_arguments", "batch_sharding", "check_fits", "choose_transport", "constrain",
           "create_model", "create_sharded", "expert_transport", "fetch", "flat_shardings", "initialize_distributed",
           "logical_to_spec",
           "make_mesh", "param_shardings", "parse_mesh_spec", "place", "process_rows", "routed_experts",
           "shard_batch", "shard_like", "start_processes"]
