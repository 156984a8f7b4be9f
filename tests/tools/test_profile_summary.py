"""`tools/profile_summary.py` on a hand-made trace and HLO dump: device time per step by program
and scope, a fusion attributed to the scope most of its fused instructions come from rather than
its root's or its deepest one's."""

import gzip
import json
import subprocess
import sys

import pytest

HLO = """HloModule jit_train_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_select (param_0: f32[4], param_1: pred[]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  %param_1 = pred[] parameter(1)
  %cat.1 = f32[4]{0} add(%param_0, %param_0), metadata={op_name="jit(train_step)/transpose(jvp(moe_layers))/moe/add"}
  %mul.1 = f32[4]{0} multiply(%cat.1, %cat.1), metadata={op_name="jit(train_step)/optimizer/mul"}
  %sqrt.1 = f32[4]{0} sqrt(%mul.1), metadata={op_name="jit(train_step)/optimizer/sqrt"}
  ROOT %sel.1 = f32[4]{0} select(%param_1, %sqrt.1, %param_0), metadata={op_name="jit(train_step)/jit(_where)/select_n"}
}

ENTRY %main.9 (p: f32[4], c: pred[]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %c = pred[] parameter(1)
  %custom-call.1 = f32[4]{0} custom-call(%p), metadata={op_name="jit(train_step)/moe_layers/moe/experts/dot_general"}
""" + (  # the fusion's own metadata names its root, the guard's select
    '  ROOT %loop_select_fusion = f32[4]{0} fusion(%custom-call.1, %c), kind=kLoop, calls=%fused_select, '
    'metadata={op_name="jit(train_step)/jit(_where)/select_n"}\n}\n')


def _event(name, dur_us, op, module, pid=1):
    return {"ph": "X", "pid": pid, "tid": 1, "ts": 0, "dur": dur_us, "name": name,
            "args": {"hlo_op": op, "hlo_module": module}}


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("trace")
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
              _event("loop_select_fusion", 300.0, "loop_select_fusion", "jit_train_step"),
              _event("nvjet_sm90_gemm", 100.0, "custom-call.1", "jit_train_step"),
              _event("input_reduce_fusion", 50.0, "input_reduce_fusion", "jit_eval.2"),
              _event("host_work", 999.0, "", "", pid=2)]
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    with gzip.open(d / "train_step.hlo.txt.gz", "wt") as f:  # as `bench.py train --profile` writes it
        f.write(HLO)
    return d


def _summary(trace_dir, *flags):
    out = subprocess.run([sys.executable, "tools/profile_summary.py", str(trace_dir), "--steps", "2", *flags],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_scopes_of_one_program_per_step(trace_dir):
    s = _summary(trace_dir, "--program", "train_step")
    assert s["device_ms_per_step"] == pytest.approx(0.2)  # 400 us over 2 steps
    assert s["busy_ms_per_step"] == s["span_ms_per_step"] == pytest.approx(0.15)  # both start at 0: 300 us covered
    assert s["kernels_per_step"] == 1.0
    assert s["by_scope_ms"] == {"train_step: optimizer": pytest.approx(0.15),
                                "train_step: moe_layers/moe/experts": pytest.approx(0.05)}
    assert s["by_class_ms"] == {"elementwise fusion": pytest.approx(0.15), "matmul": pytest.approx(0.05)}


def test_kernels_of_the_scopes_a_regex_finds(trace_dir):
    s = _summary(trace_dir, "--program", "train_step", "--scope", "experts|optimizer")
    assert s["scope_kernels"] == {  # by time; a kernel: ms and kernels per step, its (majority) op name tail
        "train_step: optimizer": [["loop_select_fusion", pytest.approx(0.15), 0.5, "optimizer/mul"]],
        "train_step: moe_layers/moe/experts": [["nvjet_sm90_gemm", pytest.approx(0.05), 0.5, "experts/dot_general"]]}
    assert list(_summary(trace_dir, "--scope", "^train_step: opt")["scope_kernels"]) == ["train_step: optimizer"]
    assert "scope_kernels" not in _summary(trace_dir)


def test_every_device_kernel_without_a_program(trace_dir):
    s = _summary(trace_dir)
    assert s["device_ms_per_step"] == pytest.approx(0.225) and s["kernels_per_step"] == 1.5  # host events left out
    assert s["by_scope_ms"]["(unattributed)"] == pytest.approx(0.025)  # no HLO for jit_eval


def test_period_of_a_repeated_block_on_the_timeline(tmp_path):
    """Two steps of three layers on each of two GPUs: an attention kernel starts each layer, two
    concurrent expert GEMMs follow it; the LM head and a host gap end each step. GPU 1 runs 50 us
    behind GPU 0, so taken together the two timelines would interleave."""
    def at(name, ts, dur, module="jit_step", pid=1):
        return {**_event(name, dur, name, module, pid), "ts": ts}

    events = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"/device:GPU:{pid - 1}"}}
              for pid in (1, 2)]
    for pid, lag in ((1, 0.0), (2, 50.0)):
        for step_start in (lag, 1000.0 + lag):
            for layer in range(3):
                t = step_start + 100.0 * layer  # a layer every 100 us
                events += [at("kernel__1", t, 20.0, pid=pid), at("gemm_fusion_dot_general_7", t + 30.0, 40.0, pid=pid),
                           at("gemm_fusion_dot_general_8", t + 35.0, 50.0, pid=pid)]  # span 30 -> 85: 55 us
            events.append(at("lm_head_gemm", step_start + 300.0, 150.0, pid=pid))
    events.append(at("kernel__1", 5000.0, 20.0, module="jit_prefill"))  # another program
    events.sort(key=lambda e: e.get("ts", 0.0))
    with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = _summary(tmp_path, "--program", "step", "--period", r"^kernel(__\d+)?$", "--phase", "dot_general")
    # per GPU: intervals 100, 100, 800 (across the step boundary: over twice the median, left out), 100, 100
    assert s["period"] == {"period_us": 100.0, "periods": 8, "phase_us": 55.0, "phase_periods": 8}
    timeline = _summary(tmp_path, "--program", "step", "--period", r"^kernel(__\d+)?$", "--timeline")["period"]
    # each layer as built above; the two GEMMs share a name once their numbers are dropped, no HLO: no scope
    assert timeline["timeline"] == [[0.0, 20.0, "kernel", ""], [30.0, 40.0, "gemm_fusion_dot_general", ""],
                                    [35.0, 50.0, "gemm_fusion_dot_general", ""]]
    # a step covers 3 x (20 + 55) us of layers and the 150 us head on each GPU; the GEMMs overlap,
    # so the summed kernel time (2 x (3 x 110 + 150)) is more
    assert s["busy_ms_per_step"] == pytest.approx(0.75) and s["device_ms_per_step"] == pytest.approx(0.96)
    # each GPU's two steps from their first kernel (its lag) to the second step's head's end: 1,450 us
    assert s["span_ms_per_step"] == pytest.approx(1.45)
