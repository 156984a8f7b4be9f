"""The GPU's clock, power and temperature while a benchmark times it, sampled by nvidia-smi.

The same training step ran 176.4 ms on one H200 and 182.4-183.2 on others (docs/benchmarks.md,
forty-second session), and at the 700 W power cap the clock gives back part of any work removed
or added (thirty-fifth): a figure says more beside the clock it ran at. `sampled()` runs
`nvidia-smi -lms` beside the block it wraps and summarises the samples; where there is no
nvidia-smi (a CPU machine) it reports nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

QUERY = ("clocks.sm", "power.draw", "temperature.gpu", "clocks_throttle_reasons.active")
SW_POWER_CAP = 0x4  # clocks_throttle_reasons.active: the software power cap holds the clock down


def gpu_id() -> str:
    """The first CUDA-visible GPU as nvidia-smi's `-i` takes it (an index or a UUID)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"


def summarise(lines: list[str], power_limit_w: float | None) -> dict:
    """nvidia-smi CSV lines of QUERY (no header, no units) -> means and extremes; {} for no sample.
    Lines that do not parse (a line cut short when the sampler stops) are left out."""
    samples = []
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(QUERY):
            continue
        try:
            samples.append((float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3], 16)))
        except ValueError:
            continue
    if not samples:
        return {}
    clock, power, temperature, reasons = zip(*samples)
    return {"samples": len(samples), "sm_clock_mhz_mean": round(sum(clock) / len(clock), 1),
            "sm_clock_mhz_min": min(clock), "power_w_mean": round(sum(power) / len(power), 1),
            "power_limit_w": power_limit_w, "temperature_c_max": max(temperature),
            "power_capped_fraction": round(sum(bool(r & SW_POWER_CAP) for r in reasons) / len(reasons), 3)}


def _power_limit(smi: str) -> float | None:
    out = subprocess.run([smi, "-i", gpu_id(), "--query-gpu=power.limit", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.strip()
    try:
        return float(out)
    except ValueError:
        return None


@contextlib.contextmanager
def sampled(interval_ms: int = 100):
    """Yields a dict that holds `summarise`'s summary of the samples taken while the block ran,
    once it has run (empty without nvidia-smi)."""
    summary: dict = {}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        yield summary
        return
    limit = _power_limit(smi)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([smi, "-i", gpu_id(), f"--query-gpu={','.join(QUERY)}",
                                 "--format=csv,noheader,nounits", "-lms", str(interval_ms)],
                                stdout=out, stderr=subprocess.DEVNULL)
        try:
            yield summary
        finally:
            proc.terminate()
            proc.wait()
            out.seek(0)
            summary.update(summarise(out.read().splitlines(), limit))
