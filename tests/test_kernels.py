"""llava_kernels: every path of the CPU matmul against numpy (float64) on the same weight values, on odd shapes;
the MindSpore op in PyNative and in a compiled graph; the finite check.

Paths are forced with llava_kernels.configure; a path this CPU lacks runs the next one down (so the test still
checks what would run here). Float32 arithmetic is held to float32 rounding; the paths that round activations
(and float16 weights) to bfloat16 to a bfloat16 rounding of each product.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

import llava_kernels
from llava_runtime import set_up_context

set_up_context("CPU", mode=1)

assert llava_kernels.available(), llava_kernels.describe()  # make setup builds them; CI has a compiler

SMALL_PATHS = ("scalar", "avx2", "avx512", "avx512bf16")
WEIGHT_TYPES = ("float32", "float16", "bfloat16")
ROWS = (1, 2, 3, 7, 16, 33, 65, 600)
OUT_IN = ((1, 1), (37, 129), (129, 37), (17, 15), (1000, 37), (33, 1000), (129, 4104), (1000, 4104))


@pytest.fixture(autouse=True)
def default_paths():
    yield
    llava_kernels.configure(small="avx512bf16", large="onednn", m_large=32)  # the best this CPU has


def bfloat16_bits(values):
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def as_float64(weight):
    if weight.dtype == np.uint16:
        return (weight.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return weight.astype(np.float64)


def example(rows, out_features, in_features, weight_type, seed=0):
    """x float32 [rows, in], W [out, in] in `weight_type` (bfloat16 as bit patterns)."""
    rng = np.random.default_rng([seed, rows, out_features, in_features])
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    w = (rng.standard_normal((out_features, in_features)) * 0.05).astype(np.float32)
    if weight_type == "bfloat16":
        return x, bfloat16_bits(w)
    return x, w.astype(weight_type)


def check(y, x, w, bfloat16_math):
    """y against x @ W^T in float64, relative to sum |x||w| per output (the scale of rounding errors)."""
    exact = x.astype(np.float64) @ as_float64(w).T
    scale = np.abs(x.astype(np.float64)) @ np.abs(as_float64(w)).T + 1e-30
    assert y.shape == exact.shape and y.dtype == np.float32 and np.isfinite(y).all()
    # bfloat16 keeps 8 significant bits: each rounded factor is off by at most 2^-9 of itself.
    tolerance = 2 ** -7 if bfloat16_math else 3e-6 * max(1.0, np.sqrt(x.shape[1]) / 16)
    error = (np.abs(y - exact) / scale).max()
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance:.3g}"
    return error


def cases(max_work):
    return [(m, n, k) for m in ROWS for n, k in OUT_IN if m * n * k <= max_work]


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
@pytest.mark.parametrize("path", SMALL_PATHS)
def test_decode_kernels_every_row_count(path, weight_type):
    llava_kernels.configure(small=path, large="decode")
    for rows, out_features, in_features in cases(3e7 if path == "scalar" else 3e9):
        x, w = example(rows, out_features, in_features, weight_type)
        bf16_dot = path == "avx512bf16" and weight_type == "bfloat16" and rows >= 4
        check(llava_kernels.matmul_numpy(x, w), x, w, bfloat16_math=bf16_dot)


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_prompt_path_every_row_count(weight_type):
    llava_kernels.configure(large="onednn", m_large=1)  # oneDNN for every row count
    errors = [check(llava_kernels.matmul_numpy(x, w), x, w, bfloat16_math=weight_type != "float32")
              for x, w in (example(*case, weight_type) for case in cases(3e9))]
    if weight_type == "float32":
        assert max(errors) < 1e-5  # float32 weights keep float32 arithmetic


def test_float32_weights_are_float32_exact_on_every_path():
    x, w = example(65, 129, 4104, "float32")
    reference = llava_kernels.matmul_numpy(x, w)
    for small in SMALL_PATHS:
        llava_kernels.configure(small=small, large="decode")
        np.testing.assert_allclose(llava_kernels.matmul_numpy(x, w), reference, rtol=2e-5, atol=2e-5)


@ms.jit
def compiled_matmul(x, w):
    return llava_kernels.MATMUL(x, w) * 1.0


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "graph"])
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_mindspore_op(weight_type, compiled):
    run = compiled_matmul if compiled else llava_kernels.MATMUL
    for shape, out_features in (((1, 1, 4104), 129), ((2, 3, 37), 1000), ((600, 129), 37), ((1, 65, 1000), 33)):
        rows, in_features = int(np.prod(shape[:-1])), shape[-1]
        x, w = example(rows, out_features, in_features, weight_type, seed=1)
        weight = Tensor(w.view(np.float16)).view(ms.bfloat16) if weight_type == "bfloat16" else Tensor(w)
        y = run(Tensor(x.reshape(shape)), weight)
        assert y.dtype == ms.float32 and tuple(y.shape) == shape[:-1] + (out_features,)
        check(y.asnumpy().reshape(rows, out_features), x, w, bfloat16_math=weight_type != "float32")


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_first_nonfinite(weight_type):
    _, w = example(1, 1000, 4104, weight_type)
    assert llava_kernels.first_nonfinite(w) == -1
    flat = w.reshape(-1)
    for index, value in ((3_000_001, np.inf), (77, np.nan), (4_103_999, -np.inf)):
        broken = flat.copy()
        broken[index] = bfloat16_bits(np.float32(value))[0] if weight_type == "bfloat16" else value
        assert llava_kernels.first_nonfinite(broken.reshape(w.shape)) == index
    largest = np.finfo(np.float16).max if weight_type == "float16" else 3e38
    edge = np.full(10, largest, np.float32)
    edge = bfloat16_bits(edge) if weight_type == "bfloat16" else edge.astype(weight_type)
    assert llava_kernels.first_nonfinite(edge) == -1  # the largest finite values are finite
