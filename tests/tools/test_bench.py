"""`tools/count_flops.py` against published per-token figures, and `tools/bench.py train --peer`:
the HF transformers peer trains the same model (parameter for parameter) in the same run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from count_flops import flops_per_token  # noqa: E402

from dsv3_jax.config import ModelConfig  # noqa: E402


def test_flops_per_token_match_the_published_figures():
    # DeepSeek's "250 GFLOPS per token" training cost of V3 at 4,096 tokens (Insights into
    # DeepSeek-V3, Table 2) and PERF.md's 4.83 for its bench shape (no MTP module)
    assert flops_per_token(ModelConfig.preset("v3_671b"), 4096) / 1e9 == pytest.approx(250, rel=0.005)
    assert flops_per_token(ModelConfig.preset("bench"), 4096) / 1e9 == pytest.approx(4.83, abs=0.005)


def _bench(*args):
    """On one CPU device (the tests check how the speeds are reported, not what they are)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "train", "--preset", "tiny",
                           "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def with_peer():
    out = _bench("--peer")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peer_trains_the_same_model_and_the_ratio_is_of_tokens_per_second(with_peer):
    ours, peer = with_peer, with_peer["peer"]
    main = ModelConfig.preset("tiny", num_nextn_predict_layers=0)
    assert ours["mtp_depth"] == 0 and ours["params"] == peer["params"]
    assert ours["gflop_per_token"] == peer["gflop_per_token"] == pytest.approx(flops_per_token(main, 32) / 1e9)
    assert (peer["batch"], peer["seq"], peer["timed_steps"]) == (2, 32, 2)
    assert peer["tokens_per_s"] == pytest.approx(2 * 32 / (peer["step_ms_median"] / 1e3))
    assert with_peer["vs_peer"] == pytest.approx(ours["tokens_per_s_per_device"] / peer["tokens_per_s"])
    assert peer["loss"] == pytest.approx(ours["loss"], rel=0.1)  # both ~ln(vocab) at random init


def test_steps_in_flight_runs_one_more_step_than_it_times():
    from bench_train import steps_in_flight

    step = jax.jit(lambda state, batch: (state + batch, {"loss": state}))
    state, seconds = steps_in_flight(step, jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32), 3)
    assert int(state) == 4 and len(seconds) == 3 and (seconds > 0).all()


def test_mtp_depth_adds_the_module_and_its_flops():
    out = _bench("--mtp-depth", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mtp_depth"] == 1
    assert r["gflop_per_token"] == pytest.approx(flops_per_token(ModelConfig.preset("tiny"), 32, mtp=True) / 1e9)


def test_peer_with_mtp_is_refused():
    out = _bench("--peer", "--mtp-depth", "1")
    assert out.returncode == 2 and "the HF peer's model has no MTP module" in out.stderr
