"""Where the time goes: device kernels of a jax.profiler trace, summed by name and by op class.

    python tools/profile_summary.py TRACE_DIR [--steps 2] [--top 25]

Reads the largest trace file (`*trace.json.gz`, written by `jax.profiler.trace(...,
create_perfetto_trace=True)`, as `tools/bench.py train --profile DIR` does), keeps the
events on device (GPU/TPU) timelines and prints one JSON object: milliseconds per step for
each op class and for the top kernels. Classes come from the kernel names (XLA fusion and
library names), so they are a guide, not an exact attribution.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

CLASSES = (  # first match wins
    ("collective", r"all-?to-?all|all-?gather|all-?reduce|reduce-?scatter|nccl|ragged.?all|collective"),
    ("grouped_matmul", r"ragged|grouped|gmm|megablox"),
    ("attention", r"flash|attention|attn|mha|fmha|cudnn"),
    ("matmul", r"gemm|matmul|dot|cublas|cutlass|sm90_xmma|nvjet|wgmma"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|dynamic.?update|slice|concatenate|pad"),
    ("reduction/sort", r"reduce|sort|scatter|gather|cumsum|argsort"),
    ("elementwise fusion", r"fusion|loop|input|convert|multiply|add|select"),
)


def device_events(path: str) -> list[dict]:
    """Complete events ('X') on device timelines of one Perfetto trace."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if re.search(r"/device:(GPU|TPU)|\bGPU\b|\bTPU\b", name)}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in device and "dur" in e]


def classify(name: str) -> str:
    low = name.lower()
    return next((c for c, pattern in CLASSES if re.search(pattern, low)), "other")


def summarize(trace_dir: str, steps: int, top: int) -> dict:
    paths = glob.glob(os.path.join(trace_dir, "**", "*trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"no *trace.json.gz under {trace_dir}: trace with create_perfetto_trace=True")
    by_name: collections.Counter = collections.Counter()
    ops: dict[str, str] = {}  # kernel -> the HLO op it ran for, where the trace says
    for e in device_events(max(paths, key=os.path.getsize)):
        by_name[e["name"]] += e["dur"] / 1e3 / steps  # us -> ms per step
        args = e.get("args", {})
        ops.setdefault(e["name"], str(args.get("long_name") or args.get("hlo_op") or "")[:160])
    by_class: collections.Counter = collections.Counter()
    for name, ms in by_name.items():
        by_class[classify(name)] += ms
    return {"device_ms_per_step": round(sum(by_name.values()), 2),
            "by_class_ms": {c: round(ms, 2) for c, ms in by_class.most_common()},
            "top_kernels_ms": [[n[:120], round(ms, 3), classify(n), ops[n]] for n, ms in by_name.most_common(top)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=2, help="steps the trace covers (results are per step)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    print(json.dumps(summarize(args.trace_dir, args.steps, args.top)))


if __name__ == "__main__":
    main()
