"""Per-device memory plan for a config on a mesh, checked by lowering the real sharded train step.

    python tools/plan.py --preset v3_671b --mesh fsdp=8,expert=8,tensor=4 --devices 256 \\
        --batch 64 --seq 4096 --remat full --decode-batch 64 --context 32768

Prints a table and one JSON line (dsv3_jax.parallel.plan documents the accounting). Unless
--no-lower, it lowers the jitted train step on N fake CPU devices with abstract inputs (a
sharding error fails here); --compile also compiles it and prints XLA's memory analysis beside
the hand accounting (feasible for small presets or a reduced --layers depth).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="v3_671b")
    p.add_argument("--mesh", default=None, help="data=..,fsdp=..,expert=..,tensor=.. (default: all on data)")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--layers", type=int, default=None,
                   help="reduced depth (real widths) for lowering/compiling; the accounting stays full depth")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8_emulated", "fp8_native"])
    p.add_argument("--batch", type=int, default=None, help="global sequences per micro-batch (default: batch shards)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--moments", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--remat", default="none", choices=["none", "full"])
    p.add_argument("--attention", default="xla", choices=["xla", "flash"])
    p.add_argument("--decode-batch", type=int, default=0)
    p.add_argument("--context", type=int, default=0)
    p.add_argument("--hbm", default=None, help="GiB per device, or one of tpu_v5p, tpu_v6e, h100, h200")
    p.add_argument("--no-lower", action="store_true")
    p.add_argument("--compile", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from dsv3_jax.config import ModelConfig
    from dsv3_jax.parallel import BATCH_AXES, parse_mesh_spec, plan

    config = ModelConfig.preset(args.preset)
    kw = dict(seq=args.seq, accum=args.accum, precision=args.precision,
              moments={"fp32": "float32", "bf16": "bfloat16"}[args.moments], remat=args.remat,
              attention=args.attention, decode_batch=args.decode_batch, context=args.context)
    sizes = parse_mesh_spec(args.mesh, args.devices)
    batch = args.batch or math.prod(sizes[a] for a in BATCH_AXES)  # default: one sequence per batch shard
    setup = plan.make_setup(config, sizes, args.devices, batch=batch, **kw)
    result = plan.account(setup)
    result["preset"] = args.preset
    result["parameters"] = plan.parameter_counts(config)
    if args.hbm:
        hbm = plan.HARDWARE.get(args.hbm) or float(args.hbm)
        result["hbm_gib"], result["fits"] = hbm, plan.fits(result, hbm)

    if not args.no_lower:
        reduced = setup
        if args.layers:
            depth = dict(num_hidden_layers=args.layers,
                         first_k_dense_replace=min(config.first_k_dense_replace, max(args.layers - 1, 0)))
            reduced = plan.make_setup(config.replace(**depth), dict(setup.mesh), setup.devices,
                                      batch=setup.batch, **kw)
        mesh = plan.mesh_for(reduced)
        t0 = time.perf_counter()
        lowered = plan.lower_train_step(reduced, mesh)
        result["lowered"] = {"layers": reduced.config.num_hidden_layers, "seconds": round(time.perf_counter() - t0, 1)}
        if args.compile:
            t0 = time.perf_counter()
            result["xla_memory"] = plan.memory_analysis(lowered.compile())
            result["xla_memory"]["compile_seconds"] = round(time.perf_counter() - t0, 1)
            if args.layers:
                result["xla_memory_accounting"] = plan.account(reduced)["train_total"]
    print(table(result))
    print(json.dumps(result))
    return result


def table(r: dict) -> str:
    from dsv3_jax.parallel.plan import fmt_bytes

    mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items())
    act = r.get("activation_detail", {})
    rows = [
        ("parameters (fp32 master)", r["params"]),
        (f"optimizer state (Adam m+v {r['moments']})", r["optimizer"]),
        ("gradients (fp32" + (" + accumulator)" if r["accum"] > 1 else ")"), r["gradients"]),
        (f"activations (remat {r['remat']}, attention {r['attention']})", r.get("activations", 0)),
        (f"weight copies for backward ({r['precision']})", r.get("weight_copies", 0)),
        ("= training total", r["train_total"]),
        (f"latent KV cache (batch {r['decode_batch']} x context {r['context']})", r["kv_cache"]),
        ("expert all-to-all sent per step", r["all_to_all_per_step"]),
    ]
    lines = [f"{r['preset']} on {r['devices']} devices ({mesh}); micro-batch {r['batch']} x {r['seq']} "
             f"({r['local_batch']} per device), {r['accum']} micro-batch(es)/step", "per device:"]
    lines += [f"  {name:<52} {fmt_bytes(v):>14}" for name, v in rows]
    if act:
        lines.append(f"  activations: none {fmt_bytes(act['none'])}, full {fmt_bytes(act['full'])}; "
                     f"per layer (none) dense {fmt_bytes(act['per_layer_none']['dense'])}, "
                     f"moe {fmt_bytes(act['per_layer_none']['moe'])}")
    if "fits" in r:
        lines.append(f"  fits in {r['hbm_gib']} GiB (90% usable): {r['fits']}")
    if "lowered" in r:
        lo = r["lowered"]
        lines.append(f"  lowered the sharded train step ({lo['layers']} layers) in {lo['seconds']} s")
    if "xla_memory" in r:
        m = r["xla_memory"]
        lines.append(f"  XLA memory analysis: arguments {fmt_bytes(m['argument'])}, "
                     f"outputs {fmt_bytes(m['output'])} (aliased {fmt_bytes(m['alias'])}), "
                     f"temporaries {fmt_bytes(m['temp'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
