"""Our kernels alone at a preset's layer shapes, timed in flight:
`python tools/bench.py kernels --preset bench [--batch 4 --seq 4096] [--rounds 8 --calls 20] [--package DIR]`.

Cases, each through the implementation the model picks here (`kernels` defaults): causal
attention forward, and forward + backward, at the preset's MLA head dims (q/k
qk_nope + qk_rope, v v_head_dim; k in MLA's two parts); where the default is "hopper" also its
backward kernels alone (`kernels.attention_backward.backward`, on the residuals the model's
forward saves); the routed experts' gate-and-up and down products over batch x seq x
num_experts_per_tok rows, gamma(4)-skewed over the experts (seeded), forward and forward +
backward (dx and dW).

A measurement queues `--calls` calls and waits for the last; the cases take turns for
`--rounds` rounds, so a clock that drifts (a power-capped GPU's) spreads over all of them.
Timed synced, one call at a time, the same kernel moved 10-20% between runs minutes apart on an
H200; this way, a few percent (docs/benchmarks.md, fortieth session). Prints one JSON line per
case: median and min over the rounds of the milliseconds a call, TFLOP/s at the median (causal
attention counts half the score matrix: 2 products forward, 5 backward), and whether the case
ran here. `--package DIR` imports dsv3_jax from DIR instead (e.g. another revision's, from
`git archive REV dsv3_jax | tar -x -C DIR`), so two revisions' kernels are timed by one harness.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# dsv3_jax is imported inside the functions: `--package` chooses which copy first


def in_flight_ms(f, args, calls: int) -> float:
    """Milliseconds a call of f(*args), `calls` of them queued and the last waited for."""
    t0 = time.perf_counter()
    for _ in range(calls):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls * 1e3


def interleaved(cases: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """{name: (f, args)} -> {name: ms a call in each round}: every case waited for once first
    (its compile), then the rounds, each timing every case in turn."""
    for f, args in cases.values():
        jax.block_until_ready(f(*args))
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (f, args) in cases.items():
            times[name].append(in_flight_ms(f, args, calls))
    return times


def forward_backward(f):
    """f(*inputs) -> jitted (*inputs, cotangent) -> (f's output, the inputs' cotangents). The
    output is returned so the forward runs: a product's backward does not read it, and the
    pullback alone would leave the forward dead code."""
    def run(*args):
        out, pull = jax.vjp(f, *args[:-1])
        return out, pull(args[-1])
    return jax.jit(run)


def build_cases(config, batch: int, seq: int) -> tuple[dict, dict, dict]:
    """-> ({name: (f, args)}, {name: FLOPs a call}, {name: why it does not run here})."""
    from dsv3_jax.kernels import attention, attention_backward, grouped_matmul

    cases, flops, skipped = {}, {}, {}
    B, T, H = batch, seq, config.num_attention_heads
    nope, rope, Kv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    K, scale = nope + rope, (nope + rope) ** -0.5
    keys = jax.random.split(jax.random.key(0), 8)
    q, k = (jax.random.normal(key, (B, T, H, K), jnp.bfloat16) for key in keys[:2])
    v, g = (jax.random.normal(key, (B, T, H, Kv), jnp.bfloat16) for key in keys[2:4])
    parts = lambda k: (k[..., :nope], k[..., nope:])  # noqa: E731  MLA's k_nope and k_pe
    attend = lambda q, k, v: attention.dot_product_attention(q, parts(k), v, None, scale)  # noqa: E731
    pairs = B * H * T * T / 2  # causal: half the scores
    cases["attention forward"] = (jax.jit(attend), (q, k, v))
    flops["attention forward"] = 2 * pairs * (K + Kv)
    cases["attention forward+backward"] = (forward_backward(attend), (q, k, v, g))
    flops["attention forward+backward"] = 2 * pairs * (4 * K + 3 * Kv)
    if attention.default_impl(q, v) == "hopper":  # the residuals the model's forward saves for it
        forward = jax.jit(attention._tokamax_then_fwd, static_argnums=(2, 4, 5))
        _, residuals = forward(q, parts(k), (nope, rope), v, scale, "hopper")
        cases["attention backward (hopper)"] = (
            jax.jit(lambda *a: attention_backward.backward(*a, scale, (nope, rope))), (*residuals, g))
        flops["attention backward (hopper)"] = 2 * pairs * (3 * K + 2 * Kv)
    else:
        skipped["attention backward (hopper)"] = f"the default attention here is {attention.default_impl(q, v)!r}"

    E, D, F, top = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    M = B * T * top
    share = np.random.RandomState(0).gamma(4.0, size=E)
    sizes = np.floor(share / share.sum() * M).astype(np.int32)
    sizes[0] += M - sizes.sum()
    sizes = jnp.asarray(sizes)
    for name, (n_in, n_out) in {"routed gate_up": (D, 2 * F), "routed down": (F, D)}.items():
        x = jax.random.normal(keys[4], (M, n_in), jnp.bfloat16)
        w = jax.random.normal(keys[5], (E, n_in, n_out), jnp.bfloat16) * n_in ** -0.5
        dy = jax.random.normal(keys[6], (M, n_out), jnp.bfloat16)
        product = lambda x, w: grouped_matmul.grouped_matmul(x, w, sizes)  # noqa: E731
        cases[f"{name} forward"] = (jax.jit(product), (x, w))
        cases[f"{name} forward+backward"] = (forward_backward(product), (x, w, dy))
        flops[f"{name} forward"], flops[f"{name} forward+backward"] = 2 * M * n_in * n_out, 6 * M * n_in * n_out
    return cases, flops, skipped


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--calls", type=int, default=20, help="calls queued a measurement")
    p.add_argument("--package", help="a directory holding the dsv3_jax package to time instead of this tree's")
    args = p.parse_args()
    if args.rounds < 1 or args.calls < 1:
        p.error("--rounds and --calls must be at least 1")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.abspath(args.package) if args.package else here
    if not os.path.isfile(os.path.join(root, "dsv3_jax", "__init__.py")):
        p.error(f"--package {args.package}: no dsv3_jax package in it")
    sys.path.insert(0, root)
    import dsv3_jax
    from dsv3_jax.config import ModelConfig

    cases, flops, skipped = build_cases(ModelConfig.preset(args.preset), args.batch, args.seq)
    times = interleaved(cases, args.rounds, args.calls)
    package = os.path.dirname(os.path.dirname(os.path.abspath(dsv3_jax.__file__)))  # where it was imported from
    common = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "calls": args.calls,
              "package": package, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    for name, ms in times.items():
        median = float(np.median(ms))
        print(json.dumps({"case": name, "ran": True, "ms_median": round(median, 4),
                          "ms_min": round(float(np.min(ms)), 4),
                          "tflops": round(flops[name] / (median / 1e3) / 1e12, 3), **common}))
    for name, why in skipped.items():
        print(json.dumps({"case": name, "ran": False, "why": why, **common}))


if __name__ == "__main__":
    main()
