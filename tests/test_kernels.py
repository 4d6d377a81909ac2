"""llava_kernels: every path of the CPU matmul against numpy (float64) on the same weight values, on odd shapes;
the MindSpore op in PyNative and in a compiled graph; the finite check.

Paths are forced with llava_kernels.configure; a path this CPU lacks runs the next one down (so the test still
checks what would run here). Float32 arithmetic is held to float32 rounding; the paths that round activations
(and float16 weights) to bfloat16 to a bfloat16 rounding of each product.
"""
import math

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
def default_paths(kernel_paths):
    return kernel_paths


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


@pytest.mark.parametrize("weight_type", ("float16", "bfloat16"))
def test_packed_kernel_every_row_count(weight_type):
    """The packed bfloat16 kernel (16-bit W, AVX512-BF16) for every row count: 64-row blocks of W, 6-row tiles of
    x and their tails, K blocks (4104 is two of 2048 and 8 values), K and N not multiples of 32 or 16."""
    llava_kernels.configure(large="packed", m_large=1)
    assert ("packed" in llava_kernels.describe()) == ("decode avx512bf16" in llava_kernels.describe())
    for x, w in (example(*case, weight_type) for case in cases(3e9)):
        check(llava_kernels.matmul_numpy(x, w), x, w, bfloat16_math="bfloat16 on" in llava_kernels.describe())


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


# ------------------------------------------------------------------------------------------- around the products

def tensor(array):
    return Tensor(np.ascontiguousarray(array))


@pytest.mark.parametrize("activation", [None, "quick_gelu", "gelu"])
@pytest.mark.parametrize("weight_type", ["float32", "float16"])
def test_linear_adds_bias_and_activation(activation, weight_type):
    for rows in (1, 5, 65):  # decode kernels and oneDNN
        x, w = example(rows, 1000, 129, weight_type, seed=2)
        bias = np.random.default_rng(rows).standard_normal(1000).astype(np.float32)
        y = llava_kernels.LINEAR(tensor(x), tensor(w), tensor(bias),
                                 Tensor([llava_kernels.ACTIVATIONS[activation]], ms.int32)).asnumpy()
        z = x.astype(np.float64) @ w.astype(np.float64).T + bias
        if activation == "quick_gelu":
            z = z / (1 + np.exp(-1.702 * z))
        elif activation == "gelu":
            z = 0.5 * z * (1 + np.vectorize(math.erf)(z / np.sqrt(2)))
        prompt = rows >= llava_kernels.prompt_rows()
        tolerance = 2 ** -7 if weight_type == "float16" and prompt else 1e-5  # bfloat16 arithmetic for prompts
        np.testing.assert_allclose(y, z, rtol=tolerance, atol=tolerance * np.abs(z).max())


def test_swiglu_is_silu_gate_times_up():
    for rows in (1, 3, 40):
        x, gate = example(rows, 301, 77, "float32", seed=3)
        _, up = example(rows, 301, 77, "float32", seed=4)
        y = llava_kernels.SWIGLU(tensor(x), tensor(gate), tensor(up)).asnumpy()
        g = x.astype(np.float64) @ gate.T.astype(np.float64)
        z = g / (1 + np.exp(-g)) * (x.astype(np.float64) @ up.T.astype(np.float64))
        np.testing.assert_allclose(y, z, rtol=1e-5, atol=1e-5 * np.abs(z).max())


def test_norms():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 7, 1001)) * 3 + 1).astype(np.float32)
    weight, bias = rng.standard_normal(1001).astype(np.float32), rng.standard_normal(1001).astype(np.float32)
    eps = Tensor([1e-5], ms.float32)
    x64 = x.astype(np.float64)
    centered = x64 - x64.mean(-1, keepdims=True)
    layer = centered / np.sqrt((centered ** 2).mean(-1, keepdims=True) + 1e-5) * weight + bias
    np.testing.assert_allclose(llava_kernels.LAYER_NORM(tensor(x), tensor(weight), tensor(bias), eps).asnumpy(), layer,
                               rtol=1e-4, atol=1e-5)
    rms = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(llava_kernels.RMS_NORM(tensor(x), tensor(weight), eps).asnumpy(), rms, rtol=1e-4,
                               atol=1e-5)


@ms.jit
def compiled_attention(q, k, v, mask, scale, half):
    return llava_kernels.ATTENTION(q, k, v, mask, scale, half) * 1.0


@ms.jit
def compiled_attention_after_prefix(q, k, v, prefix_k, prefix_v, mask, scale, half):
    return llava_kernels.ATTENTION_AFTER_PREFIX(q, k, v, prefix_k, prefix_v, mask, scale, half) * 1.0


@ms.jit
def compiled_self_attention(q, k, v, heads, scale, half):
    return llava_kernels.SELF_ATTENTION(q, k, v, heads, scale, half) * 1.0


def bfloat16_math():
    """Whether the prompt path has bfloat16 products here (a CPU with bfloat16 arithmetic, oneDNN, not forced to
    the decode kernels): else the attention's `half` flag keeps float32 too."""
    return "bfloat16 on" in llava_kernels.describe()


def rounded(x, half):
    """x as the kernels' bfloat16 products see it (half and a CPU with bfloat16 arithmetic), else as it is."""
    return as_float64(bfloat16_bits(x)) if half and bfloat16_math() else np.asarray(x, np.float64)


def reference_attention(q, k, v, mask, scale, half=False):
    """float64, with q, k, v and the probabilities rounded as `half` products round them."""
    scores = np.einsum("bhtd,bhld->bhtl", rounded(q, half), rounded(k, half)) * scale
    if mask is not None:
        scores = scores + mask
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = rounded((scores / scores.sum(-1, keepdims=True)).astype(np.float32), half)
    return np.einsum("bhtl,bhld->bhtd", probs, rounded(v, half))


def check_attention(out, q, k, v, mask, scale, half, layout=lambda x: x):
    """`out` is the reference (layout: to the op's output layout); half products: not float32's. (A probability
    at a rounding boundary may round the other way in float32 than in float64: 1 bfloat16 ulp, ~1e-4 here.)"""
    np.testing.assert_allclose(out, layout(reference_attention(q, k, v, mask, scale, half)), rtol=1e-3 if half else
                               1e-4, atol=5e-4 if half else 1e-5)
    if half and bfloat16_math():
        assert np.abs(out - layout(reference_attention(q, k, v, mask, scale))).max() > 5e-4


def heads_major(x, heads):
    """[B, T, H*D] -> [B, H, T, D]."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("shape", [(1, 4, 17, 16), (2, 3, 9, 5), (1, 16, 577, 64)])  # the last: CLIP ViT-L/14-336
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "graph"])
@pytest.mark.parametrize("half", [False, True], ids=["float32", "bfloat16"])
def test_self_attention_splits_heads_by_strides(shape, compiled, half):
    """The vision tower's attention: q, k, v [B, T, H*D] as the projections write them, out in the same layout."""
    batch, heads, length, dim = shape
    rng = np.random.default_rng(list(shape))
    q, k, v = (rng.standard_normal((batch, length, heads * dim)).astype(np.float32) for _ in range(3))
    scale = dim ** -0.5
    op = compiled_self_attention if compiled else llava_kernels.SELF_ATTENTION
    out = op(tensor(q), tensor(k), tensor(v), Tensor([heads], ms.int32), Tensor([scale], ms.float32),
             Tensor([int(half)], ms.int32)).asnumpy()
    check_attention(out, heads_major(q, heads), heads_major(k, heads), heads_major(v, heads), None, scale, half,
                    layout=lambda x: x.transpose(0, 2, 1, 3).reshape(out.shape))


@pytest.mark.parametrize("shape, mask_shape", [
    ((2, 3, 9, 9, 8), (1, 1, 9, 9)),         # a causal prompt, one mask for every row and head
    ((2, 3, 1, 300, 64), (2, 1, 1, 300)),    # decode: one token per row over the cache, a row's own mask
    ((1, 2, 5, 7, 3), (1, 2, 5, 7)),         # a mask per head
    ((1, 32, 600, 600, 128), (1, 1, 600, 600)),  # a 7B prompt: heads in groups
])
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "graph"])
@pytest.mark.parametrize("half", [False, True], ids=["float32", "bfloat16"])
def test_attention(shape, mask_shape, compiled, half):
    batch, heads, queries, keys, dim = shape
    rng = np.random.default_rng(list(shape))
    q = rng.standard_normal((batch, heads, queries, dim)).astype(np.float32)
    k = rng.standard_normal((batch, heads, keys, dim)).astype(np.float32)
    v = rng.standard_normal((batch, heads, keys, dim)).astype(np.float32)
    mask = np.where(rng.random(mask_shape) < 0.3, -1e9, 0.0).astype(np.float32)
    mask[..., 0] = 0.0  # every query sees something
    scale = dim ** -0.5
    op = compiled_attention if compiled else llava_kernels.ATTENTION
    out = op(tensor(q), tensor(k), tensor(v), tensor(mask), Tensor([scale], ms.float32),
             Tensor([int(half)], ms.int32)).asnumpy()
    assert out.shape == (batch, queries, heads, dim)  # tokens-major, as the output projection reads it
    check_attention(out, q, k, v, mask, scale, half, layout=lambda x: x.transpose(0, 2, 1, 3))


@ms.jit
def compiled_attention_decode(q, k, v, k_cache, v_cache, mask, sharing, scale):
    return llava_kernels.ATTENTION_DECODE(q, k, v, k_cache, v_cache, mask, sharing, scale) * 1.0


@pytest.mark.parametrize("shape", [(2, 3, 40, 16), (1, 32, 300, 128), (3, 2, 7, 5), (2, 4, 70, 64)])
@pytest.mark.parametrize("path", ["scalar", "avx512"])
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "graph"])
@pytest.mark.parametrize("cache_type", ["float32", "float16"])
@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_attention_decode(shape, path, compiled, cache_type, shared):
    """One token per row after its cache (float32, or float16 as 16-bit weights keep it): the cached slots its
    mask shows, then itself. Row 0 sees a prefix (as KVCache.decode_mask makes), row 1 scattered slots, row 2
    none of the cache (only itself). `shared`: the last row's first third is read from row 0 (which holds the
    same prefix, as KVCache.sharing says; its own copy is made different here to show it is not read)."""
    llava_kernels.configure(small=path)
    batch, heads, length, dim = shape
    rng = np.random.default_rng(list(shape))
    q, k, v = (rng.standard_normal((batch, heads, 1, dim)).astype(np.float32) for _ in range(3))
    k_cache, v_cache = (rng.standard_normal((batch, heads, length, dim)).astype(cache_type) for _ in range(2))
    visible = np.zeros((batch, length), bool)
    visible[0, :length // 2] = True
    if batch > 1:
        visible[1] = rng.random(length) < 0.5
    mask = np.where(visible, 0.0, -1e9).astype(np.float32)[:, None, None, :]
    sharing = np.stack([np.arange(batch), np.zeros(batch)], 1).astype(np.int32)
    seen_keys, seen_values = k_cache.copy(), v_cache.copy()  # what each row's slots hold, as the kernel reads
    if shared:
        prefix, last = length // 3, batch - 1
        sharing[[0, last]] = (0, prefix)
        seen_keys[last, :, :prefix], seen_values[last, :, :prefix] = k_cache[0, :, :prefix], v_cache[0, :, :prefix]
    scale = dim ** -0.5
    op = compiled_attention_decode if compiled else llava_kernels.ATTENTION_DECODE
    out = op(*map(tensor, (q, k, v, k_cache, v_cache, mask, sharing)), Tensor([scale], ms.float32)).asnumpy()
    k_cache, v_cache = seen_keys, seen_values
    full_mask = np.concatenate([mask, np.zeros((batch, 1, 1, 1), np.float32)], -1)
    expected = reference_attention(q, np.concatenate([k_cache.astype(np.float32), k], 2),
                                   np.concatenate([v_cache.astype(np.float32), v], 2), full_mask, scale)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sharing", [[[0, 0], [2, 3]], [[0, 0], [-1, 3]], [[0, 9], [1, 0]], [[0, -1], [1, 0]]])
def test_attention_decode_refuses_a_sharing_table_outside_the_cache(sharing):
    """A source row outside the batch or a slot count outside the cache would read other memory."""
    q, cache, mask = np.zeros((2, 2, 1, 4), np.float32), np.zeros((2, 2, 8, 4), np.float32), np.zeros((2, 1, 1, 8))
    with pytest.raises(RuntimeError, match="LlavaAttentionDecode"):
        llava_kernels.ATTENTION_DECODE(*map(tensor, (q, q, q, cache, cache, mask.astype(np.float32),
                                                     np.array(sharing, np.int32))), Tensor([0.5], ms.float32))


@pytest.mark.parametrize("shape", [(3, 2, 5, 7, 8), (13, 16, 30, 581, 64), (1, 3, 1, 40, 16), (2, 32, 9, 600, 128)])
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "graph"])
@pytest.mark.parametrize("half", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("prefix_type", ["float32", "float16"])
def test_attention_after_prefix(shape, compiled, half, prefix_type):
    """Prompts continuing one cached prefix: every row attends to the one prefix [1, H, P, D] (as the KV cache
    keeps it), then causally to its own tokens; the same as attention over the prefix copied into every row."""
    batch, heads, queries, prefix_length, dim = shape
    rng = np.random.default_rng(list(shape))
    q, k, v = (rng.standard_normal((batch, heads, queries, dim)).astype(np.float32) for _ in range(3))
    prefix_k, prefix_v = (rng.standard_normal((1, heads, prefix_length, dim)).astype(prefix_type) for _ in range(2))
    mask = np.triu(np.full((queries, prefix_length + queries), -1e9, np.float32), prefix_length + 1)[None, None]
    scale = dim ** -0.5
    op = compiled_attention_after_prefix if compiled else llava_kernels.ATTENTION_AFTER_PREFIX
    out = op(*map(tensor, (q, k, v, prefix_k, prefix_v, mask)), Tensor([scale], ms.float32),
             Tensor([int(half)], ms.int32)).asnumpy()
    assert out.shape == (batch, queries, heads, dim)

    def every_row(prefix, own):
        return np.concatenate([np.broadcast_to(prefix.astype(np.float32), (batch,) + prefix.shape[1:]), own], 2)
    check_attention(out, q, every_row(prefix_k, k), every_row(prefix_v, v), mask, scale, half,
                    layout=lambda x: x.transpose(0, 2, 1, 3))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


@ms.jit
def compiled_qkv_rotary(x, wq, wk, wv, positions, cos, sin):
    return llava_kernels.QKV_ROTARY(x, wq, wk, wv, positions, cos, sin)


@pytest.mark.parametrize("batch, length, heads, dim", [(1, 1, 4, 16), (3, 1, 2, 6), (2, 5, 3, 16), (1, 40, 2, 32)])
@pytest.mark.parametrize("weight_type", ["float32", "float16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "graph"])
def test_qkv_rotary(batch, length, heads, dim, weight_type, compiled):
    """q, k, v [B, H, T, D] = the heads of x Wq^T, x Wk^T, x Wv^T; q and k rotated at each token's own position
    (rows at different offsets, as batched decode has them); one token per row and several (40: the prompt path)."""
    rng = np.random.default_rng([batch, length, heads, dim])
    hidden = 48
    x = rng.standard_normal((batch, length, hidden)).astype(np.float32)
    weights = [(rng.standard_normal((heads * dim, hidden)) * 0.1).astype(weight_type) for _ in range(3)]
    positions = (rng.integers(0, 50, (batch, 1)) + np.arange(length)).astype(np.int32)
    angles = np.outer(np.arange(100), 1.0 / 10000 ** (np.arange(0, dim, 2) / dim))
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    op = compiled_qkv_rotary if compiled else llava_kernels.QKV_ROTARY
    out = [part.asnumpy() for part in op(tensor(x), *map(tensor, weights), tensor(positions),
                                          tensor(cos.astype(np.float32)), tensor(sin.astype(np.float32)))]
    assert [part.shape for part in out] == [(batch, heads, length, dim)] * 3
    c, s = cos[positions][:, None], sin[positions][:, None]  # [B, 1, T, D]
    for part, weight in enumerate(weights):
        heads_of = (x.astype(np.float64) @ weight.astype(np.float64).T).reshape(batch, length, heads, dim)
        expected = heads_of.transpose(0, 2, 1, 3)
        if part < 2:
            expected = expected * c + rotate_half(expected) * s
        prompt = batch * length >= llava_kernels.prompt_rows()
        tolerance = 2 ** -7 if weight_type == "float16" and prompt else 1e-5  # bfloat16 prompts
        np.testing.assert_allclose(out[part], expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def test_reset_undoes_configure():
    chosen = llava_kernels.describe()
    llava_kernels.configure(small="scalar", large="decode", m_large=5)
    assert llava_kernels.describe() != chosen
    llava_kernels.reset()
    assert llava_kernels.describe() == chosen
