"""Test setup: 8 fake CPU devices and quick compiles (set before jax is imported), fp32 matmuls,
and the number of worker processes the suite runs on."""

import os

from xla_env import xla_flags  # tests/: on the path as conftest's directory

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A bounded compile cache is one JAX locks (filelock) while it reads or writes an entry, so test
# workers never read an entry another is still writing; set here, before jax is imported, so the
# notebook test's kernel, which shares the cache, writes its entries the same way. The suite's
# entries come to ~25 MB.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Identical programs compiled in different tests (or test runs) are compiled once.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

# Each test file runs whole in one worker (`--dist loadfile` in pyproject.toml), so module-scoped
# fixtures still compile once. Compiles are mostly single-threaded: on a 2-core machine like CI's,
# two workers took the suite (cold compile cache) from 936 to 610 s. Each worker loads jax, torch
# and its own compiled programs, hence the cap; `-n 0` runs in this process (one test, a debugger).
MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_TEST_WORKERS, os.cpu_count() or 1))
