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
from etils import epath

from dsv3_jax.config import ModelConfig


class CheckpointCorrupt(ValueError):
    """A checkpoint exists but cannot be read back (a ValueError: bad input, one line in the CLIs)."""


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
        """State arrays placed per `abstract_state`'s shardings; the iterator is restored in place.
        A stored state of another structure or shape is a ValueError naming the leaf."""
        self._check_fits(step, abstract_state)
        return self._restore(step, ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))

    def restore_subset(self, step: int, abstract_subset):
        """Only the stored state's leaves that `abstract_subset` names (e.g. {"params", "bias"}
        for inference: the optimizer state is never read), placed per its shardings."""
        self._check_fits(step, abstract_subset, subset=True)
        return self._restore(step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract_subset, ocp.checkpoint_utils.construct_restore_args(abstract_subset), partial_restore=True)))

    def _restore(self, step: int, args):
        try:
            return self.manager.restore(step, args=args).state
        except Exception as e:
            raise self._unrestorable(step, f"{type(e).__name__}: {e}") from e

    def _unrestorable(self, step: int, why: str) -> CheckpointCorrupt:
        return CheckpointCorrupt(f"checkpoint {self.directory}/{step} cannot be restored ({why}); remove that "
                                 "step directory to fall back to an earlier checkpoint")

    def _check_fits(self, step: int, abstract_state, subset: bool = False) -> None:
        """Compare the stored state's leaves with the target's before Orbax does: its errors for a
        changed model or optimizer are deep, and they are no reason to delete the checkpoint."""
        where = f"checkpoint {self.directory}/{step}"
        try:
            path = epath.Path(self.directory) / str(step) / "state"
            stored = _leaves(ocp.PyTreeCheckpointHandler().metadata(path).tree)
        except Exception as e:
            raise self._unrestorable(step, f"state metadata unreadable: {type(e).__name__}: {e}") from e
        target = _leaves(abstract_state)
        unused = [] if subset else [k for k in stored if k not in target]
        problems = [f"{label}: " + ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
                    for label, keys in (("stored but not in this run's state", unused),
                                        ("in this run's state but not stored", [k for k in target if k not in stored]))
                    if keys]
        problems += [f"{k}: stored {tuple(stored[k].shape)} {stored[k].dtype}, this run's {tuple(x.shape)}"
                     for k, x in target.items() if k in stored and tuple(stored[k].shape) != tuple(x.shape)][:3]
        if problems:
            raise ValueError(f"{where} holds a state that does not fit this run's ({'; '.join(problems)}): "
                             "written by a different model config or code version?")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _leaves(tree) -> dict:
    """Leaves by '/'-joined key names, so a NamedTuple target and the stored nested dicts compare."""
    def name(k):
        return str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)))
    return {"/".join(name(k) for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
