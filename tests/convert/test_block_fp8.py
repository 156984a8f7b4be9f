"""The 128x128 block FP8 quantizer against an independent numpy computation."""

import ml_dtypes
import numpy as np
import pytest
from convert_testlib import dequantize_reference

from dsv3_jax.convert import fp8


@pytest.mark.parametrize("shape", [(128, 256), (300, 200), (5, 130), (64, 576)])
def test_quantize_matches_blockwise_reference(shape):
    rng = np.random.RandomState(0)
    w = rng.randn(*shape).astype(np.float32) * np.exp(rng.randn(*shape))
    w[:3, :3] = 0  # a partly zero block
    w8, scale = fp8.quantize(w)
    assert w8.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == np.float32
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            block = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            s = np.float32(np.abs(block).max()) / np.float32(448.0)
            assert scale[bi, bj] == s
            expect = (block / s).astype(ml_dtypes.float8_e4m3fn)
            got = w8[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            np.testing.assert_array_equal(got.view(np.uint8), expect.view(np.uint8))
    back = fp8.dequantize(w8, scale)
    np.testing.assert_array_equal(back, dequantize_reference(w8, scale))
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 away from the subnormal range
    big = np.abs(w) > np.repeat(np.repeat(scale, 128, 0), 128, 1)[: shape[0], : shape[1]] * 2**-6
    assert np.all(np.abs(back - w)[big] <= np.abs(w)[big] * 2**-4 + 1e-30)


def test_zero_block_and_scale_shape_check():
    w8, scale = fp8.quantize(np.zeros((130, 10), np.float32))
    assert np.all(scale == 0) and np.all(fp8.dequantize(w8, scale) == 0)
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        fp8.dequantize(w8, np.ones((1, 1), np.float32))


def test_quantize_needs_a_2d_weight():
    with pytest.raises(ValueError, match=r"weight of shape \(2, 3, 4\): block FP8 is for 2-d weights"):
        fp8.quantize(np.ones((2, 3, 4), np.float32))
