"""Peak host memory of `tools/convert_hf.py` stays far below the checkpoint size (streaming).

Run as a script to print the numbers for a larger checkpoint:
    python tests/convert/test_memory.py [N_EXPERTS]
"""

import os
import subprocess
import sys

import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import names
from dsv3_jax.convert.hf import abstract_model
from dsv3_jax.convert.safetensors_io import write_sharded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(n_experts: int) -> ModelConfig:
    return ModelConfig.preset(
        "tiny", vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=7, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=n_experts, n_group=4, topk_group=2, num_nextn_predict_layers=1)


def write_random_hf(directory: str, config: ModelConfig) -> tuple[int, int]:
    """A random fp32 HF checkpoint written tensor by tensor; returns (bytes, largest leaf in fp32 bytes)."""
    os.makedirs(directory)
    _, _, shapes = abstract_model(config)
    items = []
    for k, leaf in enumerate(names.param_map(config)):
        per = shapes[leaf.param].shape[len(leaf.stack):]
        hf_shape = tuple(per[::-1]) if leaf.transpose else tuple(per)
        for i, name in enumerate(leaf.hf):
            items.append(([(name, np.dtype(np.float32), hf_shape)],
                          lambda s=hf_shape, seed=(k, i): [np.random.default_rng(seed).standard_normal(s, np.float32)]))
    head = {leaf.hf[0]: leaf for leaf in names.param_map(config) if not leaf.stack}
    for copy, main in names.mtp_copies(config):
        per = shapes[head[main].param].shape
        shape = tuple(per[::-1]) if head[main].transpose else tuple(per)
        k = [leaf.param for leaf in names.param_map(config)].index(head[main].param)
        items.append(([(copy, np.dtype(np.float32), shape)],
                      lambda s=shape, seed=(k, 0): [np.random.default_rng(seed).standard_normal(s, np.float32)]))
    write_sharded(directory, items, max_shard_size=100 << 20)
    config.save_hf(directory)
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    largest = max(int(np.prod(s.shape)) * 4 for s in shapes.values())
    return total, largest


def peak_rss_of_convert(src: str, out: str) -> int:
    """Peak RSS (bytes) of a `tools/convert_hf.py` process (its own rusage, via wait4)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "convert_hf.py"), src, out],
                            cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    return usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def measure(tmp: str, n_experts: int) -> dict:
    small = ModelConfig.preset("tiny")
    write_random_hf(os.path.join(tmp, "small"), small)
    baseline = peak_rss_of_convert(os.path.join(tmp, "small"), os.path.join(tmp, "small_out"))
    size, largest = write_random_hf(os.path.join(tmp, "big"), _config(n_experts))
    peak = peak_rss_of_convert(os.path.join(tmp, "big"), os.path.join(tmp, "big_out"))
    return dict(checkpoint=size, largest_leaf=largest, baseline=baseline, peak=peak)


def test_peak_memory_is_bounded(tmp_path):
    m = measure(str(tmp_path), n_experts=16)
    mb = {k: round(v / 2**20) for k, v in m.items()}
    print(f"convert_hf memory (MiB): {mb}")
    assert m["checkpoint"] > 200 << 20
    # Above the fixed cost of the process (jax, orbax, a tiny conversion), conversion holds about
    # one destination leaf, one source tensor and Orbax's write buffers: allow 3 fp32 leaves, and
    # at most half the checkpoint.
    assert m["peak"] - m["baseline"] < min(3 * m["largest_leaf"], m["checkpoint"] / 2)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = measure(tmp, int(sys.argv[1]) if len(sys.argv) > 1 else 64)
        print({k: f"{v / 2**20:.0f} MiB" for k, v in m.items()})
