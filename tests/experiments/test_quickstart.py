"""experiments/quickstart.ipynb runs headless, end to end, at the tiny size.

The notebook runs in a kernel of its own (nbclient + ipykernel), so conftest's JAX settings do not
reach it; the kernel gets its own. One CPU device: with two fake ones, 3 runs in 13 on 2 busy
cores hung in XLA:CPU's in-process collectives (the two devices waiting at different collectives,
an all-reduce and an all-gather, until XLA ended the kernel after 40 s); sharded training is
tested in tests/train and tests/parallel. XLA's backend optimisation is off,
which roughly halves the compile time that is most of this test's cost. A last cell, added here
only, reports the notebook's results for the assertions.
"""

import json
import math
import os
import pathlib

import nbformat
from nbclient import NotebookClient
from xla_env import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "experiments" / "quickstart.ipynb"
REPORT = """
import json
print("REPORT " + json.dumps({
    "backend": jax.default_backend(), "devices": jax.device_count(), "mesh": dict(mesh.shape),
    "steps": STEPS, "resume_steps": RESUME_STEPS, "seq_len": SEQ_LEN, "workdir": os.path.abspath(WORKDIR),
    "history": [r["step"] for r in history], "lm_losses": [r["lm_loss"] for r in history],
    "losses": [r["loss"] for r in history],
    "resumed": [r["step"] for r in resumed], "saved_step": saved_step, "resumed_from": resumed_from,
    "generated": generated, "generated_tokens": len(result.tokens[0]), "max_new_tokens": MAX_NEW_TOKENS,
    "load": load.tolist(), "sample_shape": list(sample.shape), "top_k": config.num_experts_per_tok,
    "moe_layers": config.num_moe_layers, "mtp_layers": config.num_nextn_predict_layers,
    "logit_diff": logit_diff,
}))
"""


def _run(tmp_path) -> tuple[nbformat.NotebookNode, dict]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(REPORT, id="test-report"))
    env = {**os.environ, "DSV3_QUICKSTART_TINY": "1", "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(ROOT / ".jax_cache"),
           "IPYTHONDIR": str(tmp_path / "ipython")}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, if any cell fails
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    line = next(x for x in text.splitlines() if x.startswith("REPORT "))
    return nb, json.loads(line.removeprefix("REPORT "))


def test_quickstart_notebook(tmp_path):
    assert NOTEBOOK.stat().st_size < 100_000, "store the notebook with its outputs cleared"
    nb, r = _run(tmp_path)

    # every local chip is on the mesh
    assert r["backend"] == "cpu" and math.prod(r["mesh"].values()) == r["devices"] == 1

    # training logged every step, finite, and learned; the live plot was drawn
    assert r["history"] == list(range(1, r["steps"] + 1))
    assert all(math.isfinite(x) for x in r["losses"] + r["lm_losses"])
    lm = r["lm_losses"]
    assert sum(lm[-3:]) / 3 < sum(lm[:3]) / 3 - 0.2, lm
    train_cell = next(c for c in nb.cells if c.get("id") == "train")
    assert any("image/png" in o.get("data", {}) for o in train_cell.outputs)

    # the checkpoint of the last step was restored and training continued from it
    assert r["saved_step"] == r["resumed_from"] == r["steps"]
    assert r["resumed"] == list(range(r["steps"] + 1, r["steps"] + r["resume_steps"] + 1))
    workdir = pathlib.Path(r["workdir"])
    assert {str(r["steps"]), str(r["steps"] + r["resume_steps"])} <= set(os.listdir(workdir / "checkpoints"))
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == r["history"] + r["resumed"]

    # generation produced text
    assert 1 <= r["generated_tokens"] <= r["max_new_tokens"] and r["generated"]

    # expert load: one row per MoE layer (MTP last), each token counted top_k times per layer
    load = r["load"]
    B, T = r["sample_shape"]
    assert len(load) == r["moe_layers"] + r["mtp_layers"]
    assert all(sum(row) == B * T * r["top_k"] for row in load[: r["moe_layers"]])
    assert all(0 < sum(row) <= B * T * r["top_k"] for row in load[r["moe_layers"]:])

    # the HF checkpoint converted both ways gives the source model's logits
    assert (workdir / "hf" / "config.json").is_file() and (workdir / "converted" / "params").is_dir()
    assert r["logit_diff"] < 1e-5
