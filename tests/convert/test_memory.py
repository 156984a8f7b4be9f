"""Peak host memory of `tools/convert_hf.py` and `tools/export_hf.py` is bounded by about one
source tensor, not by the stacked leaves (layers x experts) nor the checkpoint (streaming).

The number is the process's peak RSS (`ru_maxrss` via wait4): exact (the kernel's high-water
mark, no sampling), and honest here because nothing is memory-mapped (safetensors are read with
`readinto`, tensorstore uses file reads), so it is anonymous memory plus code, not page cache.
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
    """Stacked expert leaves gate_up_proj [6, E, 512, 2, 256] and down_proj [6, E, 256, 512], of
    2**20 * 6E and 2**19 * 6E bytes in fp32; largest source tensor: the embedding / head
    [4096, 512] (8 MiB)."""
    return ModelConfig.preset(
        "tiny", vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=7, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=n_experts, n_group=4, topk_group=2, num_nextn_predict_layers=1)


def write_random_hf(directory: str, config: ModelConfig) -> tuple[int, int, int]:
    """A random fp32 HF checkpoint written tensor by tensor; returns (bytes, largest source tensor,
    largest stacked leaf), sizes in fp32 bytes."""
    os.makedirs(directory)
    _, _, shapes = abstract_model(config)
    items = []
    for k, leaf in enumerate(names.param_map(config)):
        hf_shape = leaf.hf_shape(shapes[leaf.param].shape)
        for i, name in enumerate(leaf.hf):
            items.append(([(name, np.dtype(np.float32), hf_shape)],
                          lambda s=hf_shape, seed=(k, i): [np.random.default_rng(seed).standard_normal(s, np.float32)]))
    head = {leaf.hf[0]: leaf for leaf in names.param_map(config) if not leaf.stack}
    for copy, main in names.mtp_copies(config):
        shape = head[main].hf_shape(shapes[head[main].param].shape)
        k = [leaf.param for leaf in names.param_map(config)].index(head[main].param)
        items.append(([(copy, np.dtype(np.float32), shape)],
                      lambda s=shape, seed=(k, 0): [np.random.default_rng(seed).standard_normal(s, np.float32)]))
    write_sharded(directory, items, max_shard_size=100 << 20)
    config.save_hf(directory)
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    per_tensor = {leaf.param: int(np.prod(leaf.hf_shape(shapes[leaf.param].shape))) * 4
                  for leaf in names.param_map(config)}
    return total, max(per_tensor.values()), max(int(np.prod(s.shape)) * 4 for s in shapes.values())


def peak_rss(tool: str, *args: str) -> int:
    """Peak RSS (bytes) of a `tools/{tool}` process (its own rusage, via wait4)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", tool), *args],
                            cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    return usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def _round_trip(tmp: str, name: str, config: ModelConfig) -> dict:
    src, ckpt, out = (os.path.join(tmp, name + s) for s in ("_hf", "_ckpt", "_out"))
    size, source, stacked = write_random_hf(src, config)
    convert = peak_rss("convert_hf.py", src, ckpt)
    export = peak_rss("export_hf.py", ckpt, out, "--max-shard-size", "100MB")
    return dict(checkpoint=size, largest_source=source, largest_stacked=stacked, convert=convert,
                export=export)


def measure(tmp: str, n_experts: int) -> dict:
    """Peaks for the big checkpoint, and for the same model with 8 experts (the fixed cost of
    jax, orbax, tensorstore's threads and the model's many small leaves)."""
    return dict(big=_round_trip(tmp, "big", _config(n_experts)),
                baseline=_round_trip(tmp, "small", _config(8)))


def test_peak_memory_is_bounded(tmp_path):
    m = measure(str(tmp_path), n_experts=32)
    big, base = m["big"], m["baseline"]
    print({k: {n: f"{v / 2**20:.1f} MiB" for n, v in d.items()} for k, d in m.items()})
    assert big["checkpoint"] > 300 << 20 and big["largest_stacked"] >= 8 * big["largest_source"]
    # Above the fixed cost of the process, a tool holds one source tensor (fp32, plus its
    # transpose / cast), a few slice writes in flight and tensorstore's buffers: allow 4 source
    # tensors; one stacked leaf would not fit.
    for tool in ("convert", "export"):
        assert big[tool] - base[tool] < 4 * big["largest_source"], (tool, m)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = measure(tmp, int(sys.argv[1]) if len(sys.argv) > 1 else 32)
        print({k: {n: f"{v / 2**20:.1f} MiB" for n, v in d.items()} for k, d in m.items()})
