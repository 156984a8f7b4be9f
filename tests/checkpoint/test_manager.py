import dataclasses
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.checkpoint.manager import CheckpointCorrupt, Checkpointer, abstract_like
from dsv3_jax.config import ModelConfig
from dsv3_jax.data.pipeline import DataConfig, make_iterator
from dsv3_jax.data.tokenizer import train_tokenizer

MODEL = ModelConfig.preset("tiny")


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int = 4


def _state(mesh=None):
    """A small stand-in for TrainState: nested names, a tuple, a scalar; sharded over `mesh`'s x."""
    put = (lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))) if mesh else (lambda x, spec: x)
    return {"step": jnp.int32(3),
            "params": {"layer": {"kernel": put(jnp.arange(32.0).reshape(8, 4), P("x")),
                                 "scale": put(jnp.ones(4), P())}},
            "opt_state": (put(jnp.full((8, 4), 2.0), P("x")),)}


def _saved(directory, state, steps=(1,)):
    ckpt = Checkpointer(str(directory))
    for s in steps:
        ckpt.save(s, state, iter(grain.MapDataset.range(10).to_iter_dataset()), MODEL, Train())
    ckpt.close()
    return Checkpointer(str(directory))  # a fresh manager, as a resumed run has


def test_restore_onto_a_different_device_count(tmp_path):
    saved = _state(jax.make_mesh((8,), ("x",)))
    ckpt = _saved(tmp_path, saved)
    for mesh in (jax.make_mesh((1,), ("x",), devices=jax.devices()[:1]), jax.make_mesh((2, 4), ("x", "y"))):
        target = abstract_like(_state(mesh))
        out = ckpt.restore(1, target, iter(grain.MapDataset.range(10).to_iter_dataset()))
        for got, want, t in zip(jax.tree.leaves(out), jax.tree.leaves(saved), jax.tree.leaves(target)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            assert got.sharding == t.sharding
    ckpt.close()


@pytest.mark.parametrize("change, message", [
    (lambda s: s["params"]["layer"].update(kernel=jnp.zeros((8, 5))),
     r"params/layer/kernel: stored \(8, 4\) float32, this run's \(8, 5\)"),
    (lambda s: s["params"]["layer"].pop("scale"), r"stored but not in this run's state: params/layer/scale"),
    (lambda s: s["params"].update(extra={"w": jnp.zeros(2)}), r"in this run's state but not stored: params/extra/w"),
])
def test_a_state_of_another_shape_is_named_not_called_corrupt(tmp_path, change, message):
    """A model or optimizer that changed since the save is a mismatch naming the leaf, not
    'corrupt, remove that step' (which would send the user deleting good checkpoints)."""
    ckpt = _saved(tmp_path, _state())
    target = _state()
    change(target)
    with pytest.raises(ValueError, match=message) as e:
        ckpt.restore(1, abstract_like(target), iter(grain.MapDataset.range(10).to_iter_dataset()))
    assert not isinstance(e.value, CheckpointCorrupt) and "remove" not in str(e.value)
    assert os.listdir(tmp_path) == ["1"]
    ckpt.close()


def test_restore_subset_reads_only_the_named_leaves(tmp_path):
    ckpt = _saved(tmp_path, _state())
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    target = abstract_like({"params": _state(mesh)["params"]})
    out = ckpt.restore_subset(1, target)
    assert jax.tree.structure(out) == jax.tree.structure(target)
    np.testing.assert_array_equal(out["params"]["layer"]["kernel"], np.arange(32.0).reshape(8, 4))
    with pytest.raises(ValueError, match=r"in this run's state but not stored: params/layer/bias"):
        ckpt.restore_subset(1, {"params": {"layer": {"bias": jax.ShapeDtypeStruct((4,), jnp.float32)}}})
    ckpt.close()


def test_a_resumed_data_stream_is_the_uninterrupted_one(tmp_path):
    """Saved at step k to disk and restored into a fresh iterator, each process's batches from k
    on equal an uninterrupted run's: files of 1 to 600 words (many rows of seq_len), checkpoints
    in the middle of a document and after several epochs."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, n in enumerate([1, 100, 3, 600, 17]):
        (corpus / f"{i}.txt").write_text(" ".join(f"w{i}x{j}" for j in range(n)))
    tok = train_tokenizer([(corpus / "1.txt").read_text()], 300)
    data = DataConfig(paths=(str(corpus),), seq_len=16, batch_size=4, seed=1)
    for p in range(2):
        it = make_iterator(data, tok, p, 2)
        full = [next(it) for _ in range(60)]
        for k in (1, 23, 50):
            it = make_iterator(data, tok, p, 2)
            for _ in range(k):
                next(it)
            ckpt = Checkpointer(str(tmp_path / f"{p}-{k}"))
            ckpt.save(k, _state(), it, MODEL, Train())
            ckpt.close()
            resumed = make_iterator(data, tok, p, 2)
            ckpt = Checkpointer(str(tmp_path / f"{p}-{k}"))  # a fresh manager, as a restarted run has
            ckpt.restore(k, abstract_like(_state()), resumed)
            ckpt.close()
            for want in full[k:]:
                got = next(resumed)
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key], err_msg=f"process {p}, resumed at {k}")
