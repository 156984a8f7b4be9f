"""Fixtures shared by the kernel tests."""

import jax
import numpy as np
import pytest


@pytest.fixture
def gpu_interpret_mode(monkeypatch):
    """Pallas' GPU interpreter on the CPU for Mosaic GPU kernels, taught what the Hopper kernels
    use that it lacks in jax 0.10: a wgmma operand read through a transposed shared-memory view
    (its wgmma callback fails on the transpose; here the operand is read through the other
    transforms and transposed after) or held in registers, and register layouts (`layout_cast`,
    `load` and `broadcasted_iota`'s `layout`: hints, the identity on values)."""
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
    from jax._src.state.types import TransposeTransform
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_dtype, source_info=None, **refs):
        memory = gpu_callbacks._get_shared_memory()
        thread = memory.get_global_thread_id(int(device_id), int(thread_id))
        info = interpret_utils.GPULoggingInfo(device_id=int(device_id), grid_point_coords=tuple(
            int(c) for c in grid_point_coords), thread_id=int(thread_id), source_info=source_info)
        operands = {}
        for name in ("acc", "a", "b"):
            ref = refs[f"{name}_allocation_key_as_array"]
            if name == "a" and ref.ndim == 2:  # a register operand: the value itself
                operands[name] = (None, None, np.asarray(ref))
                continue
            key = gpu_callbacks.HostAllocationKey.from_array(ref)
            transforms = list(gpu_callbacks._remove_noop_transforms(refs[f"{name}_transforms"]))
            transpose = transforms and isinstance(transforms[-1], TransposeTransform) and transforms.pop()
            where = interpret_utils.to_range(jax.tree.map(int, tuple(transforms)))
            value = memory.get_buffer_content(key, where, thread, logging_info=info)[0]
            operands[name] = (key, where, np.transpose(value, transpose.permutation) if transpose else value)
        key, where, acc = operands["acc"]
        out = acc + np.matmul(operands["a"][2], operands["b"][2], dtype=acc_dtype)
        memory.store_buffer_content(key, where, out, thread, logging_info=info)
        return token

    monkeypatch.setattr(gpu_callbacks, "wgmma", wgmma)
    monkeypatch.setattr(plgpu, "layout_cast", lambda x, layout: x)
    monkeypatch.setattr(plgpu, "load", lambda ref, idx, layout=None, **kw: ref[idx])
    monkeypatch.setattr(plgpu, "broadcasted_iota",
                        lambda dtype, shape, dim, layout=None: jax.lax.broadcasted_iota(dtype, shape, dim))
    with force_gpu_interpret_mode(InterpretGPUParams(out_of_bounds_reads="uninitialized")):
        yield
