"""Where a run's numbers go: metrics.jsonl, TensorBoard events, and a PNG of the curves."""

from __future__ import annotations

import json
import os

import numpy as np


class MetricsWriter:
    def __init__(self, workdir: str, start: int = 0):
        """Appends to workdir's metrics.jsonl and TensorBoard events. A run resumed from step
        `start` drops what an interrupted run logged after that checkpoint (it is logged again)."""
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            kept = [r for r in read_metrics(workdir) if r["step"] <= start]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start + 1 if start else None)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, record["step"])
        for i, v in enumerate(record.get("max_violation_per_layer", [])):
            self.tb.add_scalar(f"max_violation/layer_{i}", v, record["step"])

    def close(self) -> None:
        self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(workdir: str, num_mtp_layers: int, out: str = "training.png") -> str | None:
    """Loss curves and expert-load balance (MaxVio per MoE layer, MTP layers last) over the run."""
    records = read_metrics(workdir)
    if not records:
        return None
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (a notebook's) alone

    steps = [r["step"] for r in records]
    fig = Figure(figsize=(11, 4))
    a, b = fig.subplots(1, 2)
    for key in ("loss", "lm_loss", "mtp_loss"):
        a.plot(steps, [r[key] for r in records], label=key)
    held_out = [(r["step"], r["val_lm_loss"]) for r in records if "val_lm_loss" in r]
    if held_out:
        a.plot(*zip(*held_out), "o-", label="val_lm_loss")
    a.set_xlabel("step"), a.set_ylabel("nats/token"), a.set_title("loss"), a.legend()
    vio = np.array([r["max_violation_per_layer"] for r in records])
    n_main = vio.shape[1] - num_mtp_layers
    for i in range(vio.shape[1]):
        b.plot(steps, vio[:, i], lw=0.8, label=f"MoE layer {i}" if i < n_main else f"MTP depth {i - n_main + 1}")
    b.plot(steps, [r["max_violation"] for r in records], "k", lw=2, label="mean")
    b.set_xlabel("step"), b.set_ylabel("MaxVio"), b.set_title("expert load balance"), b.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, out)
    fig.savefig(path, dpi=100)
    return path
