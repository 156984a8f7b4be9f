"""Where the time goes: device kernels of a jax.profiler trace, summed by name and by op class.

    python tools/profile_summary.py TRACE_DIR [--steps 2] [--top 25] [--program step] [--scope REGEX]
        [--period REGEX [--phase REGEX] [--timeline]]

Reads the largest trace file (`*trace.json.gz`, written by `jax.profiler.trace(...,
create_perfetto_trace=True)`, as `tools/bench.py train --profile DIR` does), keeps the
events on device (GPU/TPU) timelines and prints one JSON object: milliseconds per step for
each op class and for the top kernels. Classes come from the kernel names (XLA fusion and
library names), so they are a guide, not an exact attribution. `busy_ms_per_step` is the time
at least one kernel runs, summed over devices like the rest: below the summed kernel time where
kernels overlap (concurrent streams, as in GPU decode steps). `span_ms_per_step` is the time from
the first kernel's start to the last one's end, per device and summed likewise: for steps traced
back to back (as `bench.py train --profile` runs them), the step time on the device; less
`busy_ms_per_step`, the time no kernel runs.

Where the directory also holds compiled programs' HLO text (`*.hlo.txt[.gz]`, which `bench.py
train --profile` writes, or XLA's `--xla_dump_to=DIR/hlo --xla_dump_hlo_as_text` dumps),
each kernel is traced back to the HLO op it ran for and that op's `op_name` metadata, and
time (and the kernel count) is also summed by program and model scope (the `jax.named_scope`
path, e.g. `train_step: moe_layers/moe/experts bwd`, "bwd" marking the backward pass). A fusion
counts for the scope most of its fused instructions come from (the top level only when none
has another, the deeper on a tie), not its root's: the optimizer's update, fused under the
non-finite guard's select and with the stacking of the layers' gradients it reads, is
"optimizer", not the select's top level nor the scope of the gradient's last kernel.
`--scope REGEX` adds, for each scope the regex finds (`re.search`), its kernels: milliseconds and
kernels per step and the tail of the `op_name` the scope was read from (a fusion's: that of one
of its instructions in that scope), e.g. `--scope "attention/q( bwd)?$"`.
`--program` keeps one jitted program's kernels (e.g. a decode `step` without its prefill). GPU
command buffers hide the op behind each kernel; profile with
`XLA_FLAGS=--xla_gpu_enable_command_buffer=` to see them all.

`--period REGEX` times a block that repeats, on the timeline rather than summed: kernels whose
names match (e.g. a decode layer's attention kernel) mark its starts, and the median interval
between consecutive starts is printed. Intervals over twice the median (the LM head and the
gap to the next step) are left out. `--phase REGEX` adds the median span, first start to last
end, of the matching kernels inside each interval, e.g. the expert GEMMs of a layer. What
remains of the interval is the rest of the block's critical path. `--timeline` adds the block
as it runs: each kernel found in nine repeats out of ten, with its median start (us after the
marker's) and duration, and its scope where the HLO is there. Kernel names are taken without
their numeric suffix (one layer's `gemm_fusion_dot_229` is the next one's `_234`) and the n-th
kernel of a name in one repeat is matched with the n-th in the others. A kernel XLA compiled
once for several layers' ops carries the scope of the op the trace names (the decode step's
absorbed W_UK shows as the dense layer's). Command buffers may stay on: the kernels' times are
all it needs.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import itertools
import json
import os
import re
import statistics

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


HLO_OP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*?op_name="([^"]*)"')
HLO_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)", re.M)
HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) \(.*\{\s*$")
HLO_CALLS = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\bcalls=%?([\w.\-]+)')
NOT_SCOPES = {"while", "body", "cond", "checkpoint", "remat", "rematted_computation", "closed_call", "pjit",
              "shard_map", "main", "eval_jaxpr"}


def _key(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def op_names(trace_dir: str) -> dict[tuple[str, str], str]:
    """(HLO module, instruction name with '.'/'-' written '_' as in kernel names) -> op_name
    metadata (for a fusion, that of the scope most of its fused instructions come from); module "" holds
    every instruction too, for traces that do not name the module."""
    out = {}
    paths = [p for pattern in ("*.hlo.txt", "*.hlo.txt.gz", "*after_optimizations.txt")
             for p in glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True)]
    for path in sorted(paths, key=os.path.getsize):  # where names repeat across programs, the largest wins
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            text = f.read()
        module = HLO_MODULE.search(text)
        found, bodies, calls, body = {}, {}, [], None  # instruction -> op_name, computation -> op_names
        for line in text.splitlines():
            header = HLO_COMPUTATION.match(line)
            if header:
                body = bodies.setdefault(header.group(1), [])
                continue
            op, call = HLO_OP.match(line), HLO_CALLS.match(line)
            if op:
                found[op.group(1)] = op.group(2)
                if body is not None:
                    body.append(op.group(2))
            if call:
                calls.append(call.groups())
        for name, callee in calls:  # a fusion: the scope most of its instructions come from
            if bodies.get(callee):
                by_scope = collections.Counter(scope(op) for op in bodies[callee])
                top = max(by_scope, key=lambda sc: (sc != "(top level)", by_scope[sc], sc.count("/")))
                found[name] = next(op for op in bodies[callee] if scope(op) == top)
        for name, op in found.items():
            out[("", _key(name))] = op
            if module:
                out[(module.group(1), _key(name))] = op
    return out


def scope(op_name: str) -> str:
    """'jit(step)/transpose(jvp(moe_layers))/while/body/moe/experts/dot_general' ->
    'step: moe_layers/moe/experts bwd': the program, its named scopes, and whether it is the
    backward pass."""
    if "/" not in op_name:
        return "(top level)"
    root, *parts = op_name.split("/")[:-1]  # the jit(...) root, scopes; the primitive dropped
    names = []
    for part in parts:
        if part.startswith(("jit(", "pjit(")):  # a jitted helper (jnp.clip, ...), not a scope
            continue
        inner = re.sub(r"^(?:\w+\()+|\)+$", "", part)  # transpose(jvp(moe_layers)) -> moe_layers
        if re.fullmatch(r"[a-z_][a-z0-9_]*", inner) and inner not in NOT_SCOPES:
            names.append(inner)
    program = re.sub(r"^p?jit\((.*)\)$", r"\1", root)
    return f"{program}: " + ("/".join(names) or "(top level)") + (" bwd" if "transpose(" in op_name else "")


def classify(name: str) -> str:
    low = name.lower()
    return next((c for c, pattern in CLASSES if re.search(pattern, low)), "other")


def in_program(module: str, program: str | None) -> bool:
    """Whether an event of HLO module `module` (e.g. "jit_step.3") belongs to jitted `program`."""
    return program is None or re.sub(r"\.\d+$", "", module) in (program, f"jit_{program}")


def _by_device(events: list[dict]) -> list[list[dict]]:
    """events (in start order) split by device timeline (trace pid), each still in start order."""
    timelines: dict = collections.defaultdict(list)
    for e in events:
        timelines[e["pid"]].append(e)
    return list(timelines.values())


def _covered(events: list[dict]) -> float:
    """Time (us) with at least one of `events` running, summed over devices: on each device
    timeline the length of its events' union."""
    total = 0.0
    for timeline in _by_device(events):
        end = float("-inf")
        for a, b in ((e["ts"], e["ts"] + e["dur"]) for e in timeline):
            if b > end:
                total += b - max(a, end)
                end = b
    return total


def _span(events: list[dict]) -> float:
    """Time (us) from the first of `events` to the end of the last, summed over devices."""
    return sum(max(e["ts"] + e["dur"] for e in timeline) - timeline[0]["ts"] for timeline in _by_device(events))


def program_events(trace_dir: str, program: str | None = None) -> list[dict]:
    """Device events of jitted `program` (every program's when None) in the largest
    `*trace.json.gz` under trace_dir, in start order."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"no *trace.json.gz under {trace_dir}: trace with create_perfetto_trace=True")
    return sorted((e for e in device_events(max(paths, key=os.path.getsize))
                   if in_program(str(e.get("args", {}).get("hlo_module") or ""), program)), key=lambda e: e["ts"])


def summarize(events: list[dict], metadata: dict[tuple[str, str], str], steps: int, top: int,
              scopes: str | None = None) -> dict:
    """events (`program_events`) summed per step by kernel, op class and, with `op_names`
    metadata, model scope; the kernels of the scopes the regex `scopes` finds, one by one."""
    by_name: collections.Counter = collections.Counter()
    by_scope: collections.Counter = collections.Counter()
    scope_kernels: collections.Counter = collections.Counter()
    in_scope: dict[str, dict] = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    ops: dict[str, str] = {}  # kernel -> the HLO op it ran for, where the trace says
    for e in events:
        ms = e["dur"] / 1e3 / steps  # us -> ms per step
        op_name = _op_name(e, metadata)
        by_name[e["name"]] += ms
        where = scope(op_name) if op_name else "(unattributed)"
        by_scope[where] += ms
        scope_kernels[where] += 1
        ops.setdefault(e["name"], op_name[:200] or str(e.get("args", {}).get("hlo_op") or ""))
        if scopes and re.search(scopes, where):  # scope -> (kernel, op name's tail) -> [ms, kernels]
            kernel = in_scope[where][e["name"], "/".join(op_name.split("/")[-2:])]
            kernel[0] += ms
            kernel[1] += 1
    by_class: collections.Counter = collections.Counter()
    for name, ms in by_name.items():
        by_class[classify(name)] += ms
    out = {"device_ms_per_step": round(sum(by_name.values()), 3),
           "busy_ms_per_step": round(_covered(events) / 1e3 / steps, 3),
           "span_ms_per_step": round(_span(events) / 1e3 / steps, 3),
           "kernels_per_step": round(len(events) / steps, 1),
           "by_class_ms": {c: round(ms, 3) for c, ms in by_class.most_common()},
           "top_kernels_ms": [[n[:120], round(ms, 3), classify(n), ops[n]] for n, ms in by_name.most_common(top)]}
    if metadata:
        out["by_scope_ms"] = {s: round(ms, 3) for s, ms in by_scope.most_common(top)}
        out["by_scope_kernels_per_step"] = {s: round(scope_kernels[s] / steps, 1) for s, _ in by_scope.most_common(top)}
    if scopes:
        out["scope_kernels"] = {
            where: [[name[:120], round(ms, 3), round(n / steps, 1), op]
                    for (name, op), (ms, n) in sorted(in_scope[where].items(), key=lambda kv: -kv[1][0])[:top]]
            for where in sorted(in_scope, key=lambda w: -by_scope[w])}
    return out


def _op_name(event: dict, metadata: dict[tuple[str, str], str]) -> str:
    """The `op_name` of the HLO op a kernel event ran for, "" where the metadata does not say."""
    args = event.get("args", {})
    hlo_op, module = str(args.get("hlo_op") or ""), str(args.get("hlo_module") or "")
    return next((metadata[k] for k in ((module, _key(hlo_op)), ("", _key(hlo_op)), ("", event["name"]))
                 if k in metadata), "")


def period(events: list[dict], marker: str, phase: str | None = None,
           metadata: dict[tuple[str, str], str] | None = None) -> dict:
    """Median interval (us) between starts of the events (`program_events`) matching `marker`,
    and of the span of those matching `phase` inside each interval (module docstring). Intervals
    are taken on each device timeline and pooled. With `metadata` (`op_names`' result, {} without
    HLO) also the block's timeline, its kernels labelled with their scopes."""
    timelines = []  # (events, their start times, the marker's starts) per device
    for timeline in _by_device(events):
        times = [e["ts"] for e in timeline]
        timelines.append((timeline, times, [e["ts"] for e in timeline if re.search(marker, e["name"])]))
    gaps = [b - a for _, _, starts in timelines for a, b in itertools.pairwise(starts)]
    if not gaps:
        raise SystemExit(f"--period {marker!r}: under 2 matching kernels on every device; need at least 2")
    cut = 2 * statistics.median(gaps)
    intervals = [(timeline, times, a, b) for timeline, times, starts in timelines
                 for a, b in itertools.pairwise(starts) if b - a <= cut]
    out = {"period_us": round(statistics.median(b - a for *_, a, b in intervals), 2), "periods": len(intervals)}
    if phase:
        spans = []
        for timeline, times, a, b in intervals:
            inside = [e for e in timeline[bisect.bisect_left(times, a):bisect.bisect_left(times, b)]
                      if re.search(phase, e["name"])]
            if inside:
                spans.append(max(e["ts"] + e["dur"] for e in inside) - min(e["ts"] for e in inside))
        if spans:
            out.update(phase_us=round(statistics.median(spans), 2), phase_periods=len(spans))
    if metadata is not None:
        out["timeline"] = _timeline(intervals, metadata)
    return out


def _timeline(intervals: list, metadata: dict[tuple[str, str], str]) -> list[list]:
    """[start us, duration us, kernel, scope] of a repeat's kernels, medians over the intervals
    (`period`), in start order (module docstring)."""
    runs = collections.defaultdict(list)  # (kernel, its n-th in the interval) -> [(start, duration, op)]
    for timeline, times, a, b in intervals:
        seen: collections.Counter = collections.Counter()
        for e in timeline[bisect.bisect_left(times, a):bisect.bisect_left(times, b)]:
            name = re.sub(r"[_.]+\d+$", "", e["name"])
            runs[name, seen[name]].append((e["ts"] - a, e["dur"], _op_name(e, metadata)))
            seen[name] += 1
    rows = []
    for (name, _), v in runs.items():
        if len(v) >= 0.9 * len(intervals):
            op = collections.Counter(r[2] for r in v).most_common(1)[0][0]  # the run's usual op
            rows.append([round(statistics.median(r[0] for r in v), 1), round(statistics.median(r[1] for r in v), 1),
                         name, scope(op) if op else ""])
    return sorted(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=2, help="steps the trace covers (results are per step)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--program", help="only this jitted function's kernels (e.g. step, train_step)")
    p.add_argument("--scope", help="regex: also list the kernels of each scope it finds (module docstring)")
    p.add_argument("--period", help="regex of the kernel that starts each repeat of a block (module docstring)")
    p.add_argument("--phase", help="with --period: regex of the kernels whose span inside each repeat to time")
    p.add_argument("--timeline", action="store_true", help="with --period: each repeat's kernels, in start order")
    args = p.parse_args()
    if (args.phase or args.timeline) and not args.period:
        p.error("--phase and --timeline need --period")
    events = program_events(args.trace_dir, args.program)
    metadata = op_names(args.trace_dir)
    out = summarize(events, metadata, args.steps, args.top, args.scope)
    if args.period:
        out["period"] = period(events, args.period, args.phase, metadata if args.timeline else None)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
