"""One of two CPU processes (4 fake devices each, gloo collectives) computing the tiny model's loss.

Usage: multiprocess_worker.py PORT PROCESS_ID MESH_SPEC OUT. Writes one JSON object to the file OUT
(not stdout, where Gloo writes its connection notes from its own threads): loss, expert load, rows.
Each process feeds only its own rows of the batch.
"""

import json
import os
import sys

from xla_env import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from parallel_testlib import CONFIG, F32, B, loss_fn, tokens  # noqa: E402

from dsv3_jax.parallel import create_model, initialize_distributed, make_mesh, process_rows, shard_batch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main(port: str, process_id: str, spec: str, out: str) -> None:
    initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id), cpu_collectives="gloo")
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    mesh = make_mesh(spec)
    rows = process_rows(mesh, B)
    with jax.set_mesh(mesh):
        model = create_model(CONFIG, mesh, seed=0, **F32)
        toks = shard_batch(tokens()[rows], mesh, B)
        loss, (_, load) = nnx.jit(loss_fn)(model, toks)
    with open(out, "w") as f:
        json.dump({"loss": float(loss), "load": np.asarray(load).tolist(), "rows": [rows.start, rows.stop]}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
