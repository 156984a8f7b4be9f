"""Training-step benchmark: `python tools/bench.py train --preset bench --batch 4 --seq 4096 [--peer]`.

The local devices (`--mesh`; default all on data), random bf16-compute / fp32-parameter model,
random tokens (one document per row), the real jitted train step (`train.step`: loss, balance,
AdamW, bias update) with donated state. The model is the preset's main model, PERF.md's bench
shape (2.95B parameters at `bench`), which is also what the HF peer trains; `--mtp-depth N` adds
N MTP modules (the preset's is left out by default). Prints ONE JSON line: tokens/s and MFU from
the median step time over the timed steps (after `--warmup` untimed ones, the first of which
compiles; each step waited for before the next is dispatched), the median time a step adds with
the next one already queued as `train.loop` runs them (`step_ms_in_flight_median`, as many steps
again: the host's dispatch latency hidden), FLOPs per token from `tools/count_flops.py` (PERF.md's
convention, the MTP modules' share included when they train, against 989 TFLOP/s dense bf16 per
device), compile seconds and peak memory of the first device (`memory_stats`, null where the
backend has none), and the GPU's clock, power and how often the power cap held it while the
steps ran (`tools/gpu_monitor.py`; null without nvidia-smi). `--peer` first runs the HF
transformers peer (`tools/bench_peer.py`) at the same shape, batch and steps in a child process,
so neither holds the other's device memory, and adds its line and our tokens/s per device over
its tokens/s. `--profile DIR` also writes a jax.profiler trace of two more (untimed) steps and
the compiled program's HLO text (where the time goes, op by op and by model scope:
`tools/profile_summary.py DIR`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpu_monitor  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from count_flops import PEAK_BF16_FLOPS, flops_per_token  # noqa: E402

from dsv3_jax import fp8, kernels, parallel  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.parallel.expert import expert_layout  # noqa: E402
from dsv3_jax.train.config import TrainConfig  # noqa: E402
from dsv3_jax.train.step import init_state, jit_train_step, layers_per_scan  # noqa: E402


def steps_in_flight(compiled, state, batch, n: int):
    """n more steps as `train.loop` runs them, the next one queued before the last one is waited
    for -> (state, the seconds between consecutive steps' ends): each step's time without the
    host's dispatch latency, which a synced step pays."""
    ends, previous = [], None
    for _ in range(n + 1):
        state, metrics = compiled(state, batch)
        if previous is not None:
            jax.block_until_ready(previous)
            ends.append(time.perf_counter())
        previous = metrics
    jax.block_until_ready((state, metrics))
    return state, np.diff([*ends, time.perf_counter()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--mtp-depth", type=int, default=0, help="MTP modules trained (0: the main model only, "
                   "PERF.md's bench shape and the HF peer's model)")
    p.add_argument("--peer", action="store_true", help="also run the HF transformers peer and print the ratio")
    p.add_argument("--peer-experts", default="eager", help="the peer's experts_implementation: eager|grouped_mm")
    p.add_argument("--precision", default="bf16", choices=fp8.PRECISIONS)
    p.add_argument("--pow2-scales", action="store_true", help="FP8 scales rounded up to powers of two")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--moments-dtype", default=TrainConfig.moments_dtype, choices=("float32", "bfloat16"))
    p.add_argument("--master-weights", default="true", choices=("true", "false"),
                   help="true: bfloat16 params with float32 masters (TrainConfig.master_weights, the paper's "
                        "recipe); false: float32 params cast to bfloat16 at each use")
    p.add_argument("--profile", help="write a profiler trace of two more steps here")
    p.add_argument("--mesh", help="e.g. expert=2 over all local devices (default: all on data)")
    p.add_argument("--expert-transport", default="auto", help="TrainConfig.expert_transport: auto|ragged|dense|gather")
    p.add_argument("--expert-capacity", type=float, default=0.0,
                   help="TrainConfig.expert_capacity_factor (dense and gather transports; 0 = room for any routing)")
    p.add_argument("--remat", default="none", help="TrainConfig.remat: none|selective|full")
    p.add_argument("--scan-unroll", type=int, default=0, help="TrainConfig.scan_unroll: layers per scan iteration "
                   "(0: by backend)")
    p.add_argument("--loss-chunk", type=int, default=TrainConfig.loss_chunk, help="TrainConfig.loss_chunk: tokens")
    p.add_argument("--attention", default="auto", help="TrainConfig.attention_impl: auto|xla|tokamax|hopper|cudnn")
    p.add_argument("--grouped-matmul", default="auto",
                   help="TrainConfig.grouped_matmul_impl: auto|tokamax|ragged|tiled")
    p.add_argument("--expert-layout", default="auto", help="TrainConfig.expert_layout: auto|grouped|blocks")
    p.add_argument("--mask-documents", default=str(TrainConfig.mask_documents).lower(), choices=("true", "false"),
                   help="TrainConfig.mask_documents (false: plain causal attention, as the paper trained)")
    p.add_argument("--row-gather", default="auto", help="TrainConfig.row_gather_impl: auto|xla|pallas "
                   "(the routed experts' dispatch and combine)")
    p.add_argument("--cross-entropy", default="auto", help="TrainConfig.cross_entropy_impl: auto|xla|pallas "
                   "(the loss's softmax passes)")
    p.add_argument("--layer-update", default="auto", help="TrainConfig.layer_update_impl: auto|xla|pallas "
                   "(the optimizer's pass over a layer stack)")
    p.add_argument("--scaled-matmul", default="auto", help="TrainConfig.scaled_matmul_impl: auto|xla|pallas "
                   "(fp8_native's GEMMs)")
    args = p.parse_args()
    if args.mtp_depth < 0:
        p.error(f"--mtp-depth {args.mtp_depth}: 0 or more MTP modules")
    if args.peer and args.mtp_depth:
        p.error("--peer compares like for like, and the HF peer's model has no MTP module: drop --mtp-depth")
    peer = run_peer(args) if args.peer else None  # before this process takes device memory

    config = ModelConfig.preset(args.preset, num_nextn_predict_layers=args.mtp_depth)
    tc = TrainConfig(steps=args.warmup + args.steps, precision=args.precision, fp8_pow2_scales=args.pow2_scales,
                     moments_dtype=args.moments_dtype, master_weights=args.master_weights == "true",
                     param_dtype="bfloat16" if args.master_weights == "true" else "float32",
                     expert_transport=args.expert_transport,
                     expert_capacity_factor=args.expert_capacity,
                     attention_impl=args.attention, grouped_matmul_impl=args.grouped_matmul,
                     scaled_matmul_impl=args.scaled_matmul, row_gather_impl=args.row_gather,
                     cross_entropy_impl=args.cross_entropy, layer_update_impl=args.layer_update,
                     expert_layout=args.expert_layout, remat=args.remat,
                     scan_unroll=args.scan_unroll, loss_chunk=args.loss_chunk,
                     mask_documents=args.mask_documents == "true")
    mesh = parallel.make_mesh(args.mesh)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    host = {"tokens": rng.integers(0, config.vocab_size, (1, B, T)).astype(np.int32),  # [A=1,B,T]
            "segment_ids": np.ones((1, B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T))}
    with jax.set_mesh(mesh):
        graphdef, tx, state = init_state(config, tc, mesh)
        params = sum(x.size for x in jax.tree.leaves(state.params))
        step_fn = jit_train_step(graphdef, config, tc, tx, 10**6, state, mesh)
        batch = {k: parallel.shard_batch(v, mesh, B, batch_dim=1) for k, v in host.items()}
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        times = []
        with gpu_monitor.sampled() as gpu:
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            state, in_flight = steps_in_flight(compiled, state, batch, args.steps)
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            with gzip.open(os.path.join(args.profile, "train_step.hlo.txt.gz"), "wt") as f:
                f.write(compiled.as_text())  # op metadata for tools/profile_summary.py (~25 MB unzipped)
            with jax.profiler.trace(args.profile, create_perfetto_trace=True):
                for _ in range(2):
                    state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))

    step_s = float(np.median(times))
    tokens_per_s = B * T / step_s
    fpt = flops_per_token(config, T, mtp=args.mtp_depth > 0)
    stats = jax.devices()[0].memory_stats() or {}
    with fp8.use(fp8.recipe_for(tc.precision)), kernels.use(expert_layout=tc.expert_layout):
        layout = expert_layout()  # as the step traced it
    n_dev = mesh.devices.size
    peak = stats.get("peak_bytes_in_use")
    result = {
        "preset": args.preset, "mtp_depth": args.mtp_depth, "params": params, "precision": args.precision,
        "pow2_scales": args.pow2_scales, "batch": B, "seq": T,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "timed_steps": len(times),
        "mesh": dict(mesh.shape), "kernels": [tc.attention_impl, tc.grouped_matmul_impl, tc.scaled_matmul_impl,
                                                  tc.row_gather_impl, tc.expert_transport, tc.cross_entropy_impl,
                                                  tc.layer_update_impl],
        "expert_capacity_factor": tc.expert_capacity_factor, "expert_layout": layout,
        "mask_documents": tc.mask_documents, "remat": tc.remat, "scan_unroll": layers_per_scan(config, tc),
        "loss_chunk": tc.loss_chunk, "param_dtype": tc.param_dtype, "master_weights": tc.master_weights,
        "tokens_per_s_per_device": tokens_per_s / n_dev,
        "step_ms_median": 1e3 * step_s, "step_ms_min": 1e3 * min(times), "tokens_per_s": tokens_per_s,
        "step_ms_in_flight_median": 1e3 * float(np.median(in_flight)),
        "gflop_per_token": fpt / 1e9, "tflops": fpt * tokens_per_s / 1e12,
        "mfu": fpt * tokens_per_s / (PEAK_BF16_FLOPS * n_dev), "compile_s": compile_s,
        "peak_memory_gib": None if peak is None else peak / 2**30, "loss": float(metrics["loss"]),
        "max_violation_per_layer": [round(float(v), 3) for v in metrics["max_violation_per_layer"]],
        "gpu": gpu or None,
    }
    if peer is not None:
        result.update(peer=peer, vs_peer=result["tokens_per_s_per_device"] / peer["tokens_per_s"])
    print(json.dumps(result))


def run_peer(args) -> dict:
    """`tools/bench_peer.py` at this run's preset, batch, sequence and steps: its JSON line."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_peer.py")
    cmd = [sys.executable, script, "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--experts", args.peer_experts]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the HF peer failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
