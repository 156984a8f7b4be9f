"""Two CPU processes x 4 devices (jax.distributed over loopback, gloo) compute the one-device loss."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parallel_testlib import B, loss_fn, reference_model, tokens

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("spec", ["expert=8"])  # the expert all-to-all crosses the two processes
def test_two_processes_match_one_device(spec, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), str(HERE.parent)])
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(port), str(i), spec,
                               str(outs[i])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=400)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            p.kill()
    results = [json.loads(out.read_text()) for out in outs]
    assert sorted(tuple(r["rows"]) for r in results) == [(0, B // 2), (B // 2, B)]
    loss, (_, load) = nnx.jit(loss_fn)(reference_model(seed=0), jnp.asarray(tokens()))
    for r in results:
        np.testing.assert_allclose(r["loss"], float(loss), rtol=2e-6)
        np.testing.assert_array_equal(np.asarray(r["load"]), np.asarray(load))
