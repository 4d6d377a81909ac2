"""llava-ms's CPU kernels (kernels/llava_kernels.cpp): the matmul of every linear layer on CPU, with float32
activations and float32, float16 or bfloat16 weights stored [out, in]; what a layer does around its matmuls, each
in one pass (bias and activation, SwiGLU, LayerNorm, RMSNorm, attention); and a finite check for weights.

MindSpore 2.9's CPU backend has no bfloat16 matmul and a float16 one several times slower than float32, so
16-bit weights would otherwise be cast to float32 before every matmul (reading each weight three times, and
keeping float32 copies of them all in a compiled graph). These kernels read each weight once at its own width:
decode steps run our own AVX-512 / AVX2 kernels near memory bandwidth, prompts run oneDNN's bfloat16 matmul
(AMX or AVX512-BF16) from the libdnnl.so.3 that MindSpore ships. Measurements: bench/RESULTS.md.

`make setup` builds the library with g++ (`python research/llava/llava_kernels.py`); a missing library is
built on first import. Without a compiler MATMUL is None and the model uses MindSpore's own MatMul.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import mindspore as ms
from mindspore import ops

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "kernels", "llava_kernels.cpp")
BUILD_DIR = os.path.join(_HERE, "kernels", "build")
# Baseline x86-64 code: each ISA-specific function picks its instructions with __attribute__((target)), so
# the library runs on any x86-64 CPU and chooses its paths at load time.
_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-shared", "-fno-math-errno", "-Wall", "-Wno-maybe-uninitialized",
          "-Wno-uninitialized"]
_LIBS = ["-ldl", "-lpthread"]
_WEIGHT_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, "bfloat16": 2}


def library_path(compiler=None):
    """Where the library built from this source with these flags and this compiler lives."""
    compiler = compiler or os.environ.get("CXX", "g++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(_FLAGS + _LIBS + [version]).encode()).hexdigest()[:16]
    return os.path.join(BUILD_DIR, f"libllava_kernels-{digest}.so")


def build():
    """Compile the library if it is not built yet; returns its path. Raises RuntimeError without a compiler or
    when compiling fails."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) to build the CPU kernels")
    path = library_path(compiler)
    if os.path.exists(path):
        return path
    os.makedirs(BUILD_DIR, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
    os.close(handle)
    result = subprocess.run([compiler, *_FLAGS, SOURCE, "-o", temporary, *_LIBS], capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(temporary)
        raise RuntimeError(f"building the CPU kernels failed:\n{result.stderr[-3000:]}")
    os.replace(temporary, path)  # whole or absent, also with two builds at once
    return path


def _load():
    """(ctypes library, its path), or (None, why not)."""
    try:
        path = build()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        return None, str(error)
    lib = ctypes.CDLL(path)
    lib.llava_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.llava_configure.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]
    lib.llava_describe.restype = ctypes.c_char_p
    lib.llava_prompt_rows.restype = ctypes.c_int64
    lib.llava_first_nonfinite.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.llava_first_nonfinite.restype = ctypes.c_int64
    lib.llava_set_onednn_path.argtypes = [ctypes.c_char_p]
    lib.llava_set_onednn_path(os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so.3").encode())
    return lib, path


def _rows_of_weight(x_shape, w_shape, *_):
    return list(x_shape[:-1]) + [w_shape[0]]


def _like_first(shape, *_):
    return list(shape)


def _tokens_major(q_shape, *_):
    batch, heads, length, dim = q_shape
    return [batch, length, heads, dim]


def _rows_of_table(table_shape, ids_shape):
    return list(ids_shape) + [table_shape[1]]


def _qkv_heads(x_shape, weight_shape, _wk, _wv, _positions, table_shape, _sin):
    batch, length, head_dim = x_shape[0], x_shape[1], table_shape[1]
    return ([batch, weight_shape[0] // head_dim, length, head_dim],) * 3


def _float32(*_):
    return ms.float32


def _three_float32(*_):
    return (ms.float32,) * 3


def _op(name, out_shape, out_dtype=_float32):
    return ops.Custom(f"{_PATH_OR_ERROR}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


_LIB, _PATH_OR_ERROR = _load()
ACTIVATIONS = {None: 0, "quick_gelu": 1, "gelu": 2}  # the epilogue of LINEAR (kernels/llava_kernels.cpp)
# Made at import: a compiled graph can hold an op, but cannot run the Python that would make it. All float32 out;
# in PyNative and in compiled graphs. x float32 throughout; W float32, float16 or bfloat16 [N, K].
if _LIB is None:
    MATMUL = LINEAR = SWIGLU = LAYER_NORM = RMS_NORM = ATTENTION = SELF_ATTENTION = ATTENTION_DECODE = None
    ATTENTION_AFTER_PREFIX = EMBEDDING = QKV_ROTARY = None
else:
    MATMUL = _op("LlavaMatmul", _rows_of_weight)            # (x [..., K], W) -> x @ W^T [..., N]
    LINEAR = _op("LlavaLinear", _rows_of_weight)            # (x, W, bias [N], ACTIVATIONS code int32 [1])
    SWIGLU = _op("LlavaSwiGLU", _rows_of_weight)            # (x, W_gate, W_up) -> silu(x Wg^T) * x Wu^T
    LAYER_NORM = _op("LlavaLayerNorm", _like_first)         # (x [..., C], weight, bias, eps [1])
    RMS_NORM = _op("LlavaRMSNorm", _like_first)             # (x [..., C], weight, eps [1])
    # (q [B,H,T,D], k, v [B,H,L,D], mask [B|1,H|1,T,L], scale [1], half int32 [1]: bfloat16 products) -> [B,T,H,D]
    ATTENTION = _op("LlavaAttention", _tokens_major)
    # (q, k, v [B,H,T,D], prefix k, v [1,H,P,D] float32 or float16, mask [B|1,H|1,T,P+T], scale [1], half int32
    # [1]) -> [B,T,H,D]: prompts that continue one prefix attend to it (one copy for all rows) and to themselves
    ATTENTION_AFTER_PREFIX = _op("LlavaAttentionAfterPrefix", _tokens_major)
    # (q, k, v [B,T,H*D], heads int32 [1], scale [1], half int32 [1]) -> [B,T,H*D]: every token sees every token,
    # heads split inside
    SELF_ATTENTION = _op("LlavaSelfAttention", _like_first)
    # (q, k_new, v_new [B,H,1,D], k_cache, v_cache [B,H,L,D] float32 or float16, mask [B,1,1,L], sharing int32
    # [B,2]: row b's first sharing[b,1] slots read from row sharing[b,0], scale [1]): one token after a cache
    ATTENTION_DECODE = _op("LlavaAttentionDecode", _like_first)
    EMBEDDING = _op("LlavaEmbedding", _rows_of_table)       # (table [V, D], ids int32 [...]) -> [..., D]
    # (x [B,T,K], Wq, Wk, Wv [N,K], positions int32 [B,T], cos, sin [P,D]) -> q, k (rotated), v [B,H,T,D]
    QKV_ROTARY = _op("LlavaQKVRotary", _qkv_heads, _three_float32)


def available():
    return _LIB is not None


def describe():
    """One line: what the kernels do on this CPU, or why they are not there."""
    if _LIB is None:
        return f"not available ({_PATH_OR_ERROR.splitlines()[0]})"
    return _LIB.llava_describe().decode()


def configure(small=None, large=None, m_large=None):
    """Force paths (tests, benchmarks): small "scalar" | "avx2" | "avx512" | "avx512bf16" (a path the CPU lacks
    falls back to the next one down), large "onednn" | "decode", m_large the first row count of the prompt path."""
    status = _LIB.llava_configure((small or "").encode(), (large or "").encode(), -1 if m_large is None else m_large)
    if status:
        raise ValueError(f"unknown kernel path: small={small!r} large={large!r}")


def prompt_rows():
    """The row count from which products take the prompt path (oneDNN; bfloat16 arithmetic for 16-bit weights
    on CPUs that have it)."""
    return _LIB.llava_prompt_rows()


def reset():
    """The paths chosen at load: the best this CPU has (undoes configure)."""
    _LIB.llava_reset_paths()


def _weight_type(array):
    return _WEIGHT_TYPES["bfloat16" if array.dtype == np.uint16 else array.dtype]


def matmul_numpy(x, weight):
    """x float32 [M, K] @ weight [N, K]^T -> float32 [M, N] (uint16 weights are bfloat16 bit patterns)."""
    x = np.ascontiguousarray(x, np.float32)
    weight = np.ascontiguousarray(weight)
    y = np.empty((x.shape[0], weight.shape[0]), np.float32)
    _LIB.llava_matmul(x.ctypes.data, weight.ctypes.data, _weight_type(weight), y.ctypes.data, x.shape[0],
                      weight.shape[0], x.shape[1])
    return y


def first_nonfinite(array):
    """Flat index of the first NaN or infinity in a float32 / float16 / bfloat16-bits (uint16) array, or -1."""
    array = np.ascontiguousarray(array)
    if _LIB is None:
        values = (array.astype(np.uint32) << 16).view(np.float32) if array.dtype == np.uint16 else array
        bad = np.flatnonzero(~np.isfinite(values))
        return int(bad[0]) if bad.size else -1
    return int(_LIB.llava_first_nonfinite(array.ctypes.data, array.size, _weight_type(array)))


if __name__ == "__main__":  # make setup: build now rather than at the first run
    print(f"llava-ms CPU kernels: {describe()}", file=sys.stderr)
