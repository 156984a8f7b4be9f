"""128x128 block FP8 (e4m3) weight storage of the released checkpoints (SPEC E), on the host.

A HF weight W [out, in] is stored as W8 = e4m3(W / s) with one fp32 multiplier per 128x128 block,
`weight_scale_inv` s [ceil(out/128), ceil(in/128)], s = amax(|block|) / 448; edge blocks are
smaller than 128. Dequantization is W[i, j] = float(W8[i, j]) * s[i // 128, j // 128].
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BLOCK = 128
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for a weight of `shape` [out, in]."""
    return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def _expand(scale: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per-block scale [Ob, Ib] broadcast to the weight's [out, in]."""
    return np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[: shape[0], : shape[1]]


def dequantize(w8: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """FP8 weight [out, in] and its block scales -> fp32 [out, in]."""
    if w8.ndim != 2 or scale_inv.shape != scale_shape(w8.shape):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a weight of shape "
                         f"{tuple(w8.shape)} needs {scale_shape(w8.shape)}")
    return w8.astype(np.float32) * _expand(scale_inv.astype(np.float32), w8.shape)


def quantize(w: np.ndarray, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Weight [out, in] -> (e4m3 weight [out, in], fp32 scale_inv [ceil(out/128), ceil(in/128)]).

    A non-finite value is refused (naming the weight `name`): its block's scale would be inf or
    NaN, and the whole 128x128 block would dequantize to NaN.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"a weight of shape {w.shape}: block FP8 is for 2-d weights")
    if not np.isfinite(w).all():
        i, j = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"{name}[{i}, {j}] is {w[i, j]}: block FP8 cannot store inf or NaN")
    ob, ib = scale_shape(w.shape)
    padded = np.zeros((ob * BLOCK, ib * BLOCK), np.float32)
    padded[: w.shape[0], : w.shape[1]] = w
    amax = np.abs(padded.reshape(ob, BLOCK, ib, BLOCK)).max(axis=(1, 3))  # [Ob, Ib]
    scale = (amax / FP8_MAX).astype(np.float32)
    divisor = _expand(np.where(scale > 0, scale, 1.0).astype(np.float32), w.shape)
    w8 = np.clip(w / divisor, -FP8_MAX, FP8_MAX).astype(FP8)
    return w8, scale
