"""One Orbax CheckpointManager for everything a run needs to continue exactly.

Items per step: `state` (step, micro-batch clock, parameters, router biases, optimizer state),
`data` (the Grain iterator, one file per process) and `config` (model config.json fields and
the train config). Saves are asynchronous and the last `keep` are kept; restoring takes an
abstract target whose shardings decide where every array lands, so a run can resume on a
different mesh.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import jax
import orbax.checkpoint as ocp

from dsv3_jax.config import ModelConfig


class CheckpointCorrupt(RuntimeError):
    """A checkpoint exists but cannot be read back."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, model_config: ModelConfig, train_config) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave({"model": model_config.to_hf(), "train": dataclasses.asdict(train_config)}),
        ), force=True)

    def read_config(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointCorrupt(f"checkpoint {self.directory}/{step}: config unreadable ({e})") from e

    def restore(self, step: int, abstract_state, data_iterator):
        """State arrays placed per `abstract_state`'s shardings; the iterator is restored in place."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as e:
            raise CheckpointCorrupt(f"checkpoint {self.directory}/{step} cannot be restored "
                                    f"({type(e).__name__}: {e}); remove that step directory to fall back "
                                    "to an earlier checkpoint") from e
        return out.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
