"""XLA_FLAGS for the suite's processes and the ones its tests start: `devices` fake CPU devices
and quick compiles. The suite's time is mostly XLA compiling small programs: without LLVM's
optimisation passes compiles take about a third less time and the tiny programs run about as
fast (four test files, cold cache: 252 -> 155 s); results move by float rounding only (the tiny
model's fp32 gradients by at most 5e-9 at a scale of 2e-2), well inside every test's tolerance."""


QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {QUICK_COMPILE}"
