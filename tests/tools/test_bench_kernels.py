"""`tools/bench.py kernels`: our kernels alone, timed in flight in interleaved rounds, from this
tree or from another copy of the package."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from xla_env import xla_flags

from dsv3_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_kernels import build_cases, interleaved  # noqa: E402


def _kernels(*args):
    """On one CPU device: the portable paths (the tests check what is reported, not the speeds)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "kernels", "--preset", "tiny",
                           "--batch", "2", "--seq", "32", "--rounds", "2", "--calls", "2", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_every_case_is_reported_with_its_flops():
    out = _kernels()
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {r["case"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    assert set(lines) == {"attention forward", "attention forward+backward", "attention backward (hopper)",
                          "routed gate_up forward", "routed gate_up forward+backward",
                          "routed down forward", "routed down forward+backward"}
    ran = [r for r in lines.values() if r["ran"]]
    assert len(ran) == 6 and all(0 < r["ms_min"] <= r["ms_median"] for r in ran)
    assert all(r["package"] == ROOT and r["rounds"] == 2 and r["calls"] == 2 for r in lines.values())
    assert lines["attention backward (hopper)"]["ran"] is False
    assert "default attention here is 'xla'" in lines["attention backward (hopper)"]["why"]
    c = ModelConfig.preset("tiny")  # down: 2 x 32 tokens x top-k rows, F -> D
    rows = 2 * 32 * c.num_experts_per_tok
    down = lines["routed down forward"]
    tflops = 2 * rows * c.moe_intermediate_size * c.hidden_size / (down["ms_median"] / 1e3) / 1e12
    assert down["tflops"] == pytest.approx(tflops, abs=1e-3)
    heads, K, Kv = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    fwd = lines["attention forward"]  # causal: half the 32 x 32 scores, two products
    tflops = 2 * (2 * heads * 32 * 32 / 2) * (K + Kv) / (fwd["ms_median"] / 1e3) / 1e12
    assert fwd["tflops"] == pytest.approx(tflops, abs=1e-3)


def test_forward_and_backward_cases_compute_the_forward():
    """A product's backward does not read its output: a case timing the pullback alone would
    leave the forward out (XLA drops it) while counting its FLOPs."""
    cases, flops, _ = build_cases(ModelConfig.preset("tiny"), 2, 32)
    for name in ("attention", "routed gate_up", "routed down"):
        f, args = cases[f"{name} forward"]
        both, both_args = cases[f"{name} forward+backward"]
        out, grads = both(*both_args)
        assert all(a is b for a, b in zip(both_args, args))
        np.testing.assert_allclose(np.float32(out), np.float32(f(*args)), rtol=2e-2, atol=2e-2)
        assert [g.shape for g in grads] == [a.shape for a in args]
        assert flops[f"{name} forward+backward"] > 2 * flops[f"{name} forward"]


def test_another_copy_of_the_package_is_timed(tmp_path):
    shutil.copytree(os.path.join(ROOT, "dsv3_jax"), tmp_path / "dsv3_jax")
    out = _kernels("--package", str(tmp_path), "--rounds", "1", "--calls", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert {json.loads(line)["package"] for line in out.stdout.strip().splitlines()} == {str(tmp_path)}
    bad = _kernels("--package", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "no dsv3_jax package in it" in bad.stderr


def test_interleaved_rounds_time_every_case_after_a_first_call():
    calls = {"a": 0, "b": 0}

    def case(name):
        def f(x):
            calls[name] += 1
            return x
        return f, (1.0,)

    times = interleaved({name: case(name) for name in calls}, rounds=3, calls=4)
    assert calls == {"a": 1 + 3 * 4, "b": 1 + 3 * 4}
    assert {name: len(ms) for name, ms in times.items()} == {"a": 3, "b": 3}
    assert all(ms > 0 for t in times.values() for ms in t)
