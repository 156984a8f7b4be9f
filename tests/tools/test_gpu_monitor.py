"""`tools/gpu_monitor.py` against a stand-in nvidia-smi: the samples taken while a block runs,
summarised by hand here."""

import os
import shutil
import stat
import sys
import time
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "tools"))

import gpu_monitor  # noqa: E402

# what the stand-in prints while sampling: three samples (clock MHz, power W, temperature C,
# throttle reasons; two under the software power cap, 0x4), then a line cut short
SAMPLES = ["1980, 650.50, 60, 0x0000000000000000", "1755, 699.90, 66, 0x0000000000000004",
           "1500, 701.20, 70, 0x0000000000000005", "17"]
POWER_LIMIT = "700.00"

SCRIPT = """#!{python}
import pathlib, sys, time
pathlib.Path({args!r}).open("a").write(" ".join(sys.argv[1:]) + "\\n")
if "--query-gpu=power.limit" in sys.argv:
    print({limit!r})
else:
    print("\\n".join({samples!r}), flush=True)
    pathlib.Path({ready!r}).touch()
    time.sleep(60)
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    """-> namespace(path: a PATH with the stand-in first, args: the file of its command lines,
    ready: the file it creates once it has printed its samples)."""
    args, ready, exe = tmp_path / "args.txt", tmp_path / "ready", tmp_path / "nvidia-smi"
    exe.write_text(SCRIPT.format(python=sys.executable, args=str(args), limit=POWER_LIMIT, samples=SAMPLES,
                                 ready=str(ready)))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return types.SimpleNamespace(path=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", args=args, ready=ready)


def test_samples_taken_while_the_block_runs_are_summarised(fake_nvidia_smi, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi.path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with gpu_monitor.sampled(interval_ms=50) as gpu:
        deadline = time.monotonic() + 30
        while not fake_nvidia_smi.ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gpu == {}  # filled once the block has run
    clock, power, temperature = zip(*([float(f) for f in line.split(",")[:3]] for line in SAMPLES[:3]))
    assert gpu == {"samples": 3, "sm_clock_mhz_mean": round(sum(clock) / 3, 1), "sm_clock_mhz_min": min(clock),
                   "power_w_mean": round(sum(power) / 3, 1), "power_limit_w": float(POWER_LIMIT),
                   "temperature_c_max": max(temperature),
                   "power_capped_fraction": round(2 / 3, 3)}  # reasons 0x4 and 0x5 have the power cap's bit
    calls = fake_nvidia_smi.args.read_text().splitlines()
    assert all(c.startswith("-i 3 ") for c in calls) and calls[-1].endswith("-lms 50")  # the first visible GPU


def test_without_nvidia_smi_nothing_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with gpu_monitor.sampled() as gpu:
        assert shutil.which("nvidia-smi") is None  # the block runs, with nothing to sample it
    assert gpu == {}
