"""Benchmarks that print JSON lines: `python tools/bench.py train|decode|attention|kernels|peer ...`.

Each subcommand lives in its own module beside this file (bench_train.py, bench_decode.py,
bench_attention.py, bench_kernels.py, bench_peer.py: the HF transformers peer).
"""

import os
import runpy
import sys

SUBCOMMANDS = {"train": "bench_train.py", "decode": "bench_decode.py", "attention": "bench_attention.py",
               "kernels": "bench_kernels.py", "peer": "bench_peer.py"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        sys.exit(f"usage: python tools/bench.py {{{'|'.join(SUBCOMMANDS)}}} [options]")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), SUBCOMMANDS[sys.argv[1]])
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
