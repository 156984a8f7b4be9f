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


# Test files from the longest to the shortest (seconds, the mean of two cold-cache runs with 2
# workers on 2 cores, 2026-12), the ones under 15 s left in collection order after them. xdist
# hands a worker the next file as it runs low (`--no-loadscope-reorder` in pyproject.toml keeps
# this order; by default it sorts files by their number of tests, which put the one-test notebook
# and multi-process files last, one worker finishing them 66 s after the other): the longest
# first, the short ones filling in at the end. The suite took 1086 s in that order, 1009 and
# 882 s in this (workers within 7 s of each other; runs of one order vary by tens of seconds).
SLOWEST_FILES = [
    "train/test_loop.py",  # 323
    "parallel/test_plan.py",  # 200
    "parallel/test_sharded_model.py",  # 141
    "inference/test_checkpoint.py",  # 139
    "train/test_step.py",  # 138
    "parallel/test_expert.py",  # 123
    "test_fp8.py",  # 92
    "model/test_transformer.py",  # 90
    "experiments/test_quickstart.py",  # 65
    "inference/test_decode.py",  # 62
    "tools/test_bench.py",  # 61
    "kernels/test_grouped_matmul.py",  # 61
    "model/test_moe.py",  # 50
    "convert/test_layouts.py",  # 46
    "checkpoint/test_manager.py",  # 43
    "kernels/test_attention_backward.py",  # 40
    "eval/test_scoring.py",  # 37
    "inference/test_speculative.py",  # 27
    "convert/test_roundtrip.py",  # 27
    "convert/test_memory.py",  # 25
    "parallel/test_multiprocess.py",  # 20
    "data/test_pipeline.py",  # 20
    "train/test_losses.py",  # 19
    "convert/test_parity.py",  # 18
    "model/test_mla.py",  # 16
    "kernels/test_latent_attention.py",  # 16
    "convert/test_sharded_load.py",  # 15
]


def pytest_collection_modifyitems(config, items):
    """Each file's tests in their order, the files in SLOWEST_FILES' order (a stable sort)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    rank = {os.path.join(tests, f): i for i, f in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))
