"""LLaVA-1.5 in plain MindSpore ops: CLIP ViT vision tower -> 2-layer GELU projector -> LLaMA decoder.

Every op here has a CPU kernel (the fused Ascend kernels of MindFormers' own LLaMA do not), so the same
code runs on CPU in float32 and on Ascend in float16/bfloat16 (`compute_dtype`; norms and softmax stay float32).

Shapes: B batch, S prompt length, T tokens in a step (S at prefill, 1 at decode), L cache length,
H heads, D head dim, N images, P patches per image, F image features per image (P, or P+1 with CLS).

This file is the network only. Running it for generation (compiled steps, the prompt's padding, which cache
rows a prompt goes to) is llava_steps.py; the sampling loop is llava_generation.py; how each weight is
stored and split across ranks is llava_layout.py.
"""
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

import llava_kernels
from llava_config import DTYPE_NAMES, LlavaConfig
from llava_generation import LlavaGenerationMixin
from llava_layout import LINEARS
from llava_steps import MASK_VALUE, ModelRunner, causal_mask, merge_image_features

_DTYPES = {name: getattr(ms, name) for name in DTYPE_NAMES}


def mindspore_dtype(name):
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class Precision:
    """compute: the dtype matmuls run in; weights: the dtype matrices (linear weights, embedding tables) are
    stored in; kernels: matmuls through llava_kernels (CPU: float32 activations, weights read at their own
    width) instead of MindSpore's MatMul. Vectors (norm weights, biases, the class token) are stored and used in
    float32, as the norms and the softmax always compute in float32.

    With the kernels and 16-bit weights (`half_kernels`) the prompts' products round their inputs to bfloat16
    where the CPU has bfloat16 arithmetic, attention's included, as HF's bf16 does; and the KV cache is float16:
    a decode step reads every cached key and value (16 rows of 620 positions of the 474M bench model: as many
    bytes as its weights), and the cache holds twice the tokens; the kernels widen it as they read it."""

    compute: object = ms.float32
    weights: object = ms.float32
    kernels: bool = False

    @classmethod
    def of(cls, config):
        kernels = (config.cpu_kernels and ms.get_context("device_target") == "CPU" and llava_kernels.available())
        compute = ms.float32 if kernels else mindspore_dtype(config.compute_dtype)
        return cls(compute, mindspore_dtype(config.param_init_type), kernels)

    @property
    def half_kernels(self):
        return self.kernels and self.weights in (ms.float16, ms.bfloat16)

    @property
    def cache(self):
        """The KV cache's dtype."""
        return ms.float16 if self.half_kernels else self.compute


FLOAT32 = Precision()


class TensorParallel:
    """This process' place in the model-parallel group: `size` ranks, this one is `rank`.

    Column-parallel linears keep out_features/size output columns (no communication: the heads or MLP
    channels they produce are this rank's own); row-parallel linears keep in_features/size input rows and
    sum the partial products with one AllReduce, so every attention and MLP block costs one AllReduce.
    """

    def __init__(self, size=1, rank=0):
        self.size = size
        self.rank = rank

    def __repr__(self):
        return f"TensorParallel(size={self.size}, rank={self.rank})"


SINGLE_DEVICE = TensorParallel()


def shard_size(total, size, what):
    if total % size:
        raise ValueError(f"model_parallel={size} does not divide the {total} {what}")
    return total // size


def _matrix(shape, dtype):
    """A weight matrix without memory (MindSpore's meta device): a checkpoint's tensor becomes its data without a
    copy (llava_weights.py), and nothing is initialized only to be overwritten (seconds per GB, and a second
    copy of a 7B model). `LlavaVlm.init_weights` gives fresh values for training from scratch."""
    return Parameter(Tensor(shape=shape, dtype=dtype, device="meta"), name="weight")


class Linear(nn.Cell):
    """y = x @ W^T (+ bias), W stored [out, in]; `name` is the linear's entry in llava_layout.LINEARS, which says
    how it is split across ranks: replicated, column (this rank's out_features/size outputs) or row (this rank's
    in_features/size inputs; partial results are all-reduced before the bias). `activation`: None, "quick_gelu"
    (CLIP's MLP) or "gelu" (exact, erf: the projector's; computed in float32)."""

    def __init__(self, name, in_features, out_features, bias=True, precision=FLOAT32,
                 tensor_parallel=SINGLE_DEVICE, activation=None):
        super().__init__()
        kind = LINEARS[name]
        size = tensor_parallel.size
        if kind.parallel == "column":
            out_features = shard_size(out_features, size, "output features")
        elif kind.parallel == "row":
            in_features = shard_size(in_features, size, "input features")
        self.weight = _matrix(kind.weight_shape(in_features, out_features), precision.weights)
        self.bias = Parameter(initializer("zeros", (out_features,), ms.float32), name="bias") if bias else None
        self.compute_dtype = precision.compute
        self.all_reduce = ops.AllReduce() if kind.parallel == "row" and size > 1 else None
        self.activation = activation
        # The kernels add the bias and the activation as they write the product (not before an all-reduce).
        self.fused = precision.kernels and self.all_reduce is None and (bias or activation is not None)
        if self.fused:
            self.activation_code = Tensor([llava_kernels.ACTIVATIONS[activation]], ms.int32)
            self.zero_bias = None if bias else Tensor(np.zeros(out_features, np.float32))
        # No cast of the weight on the kernel path: a compiled graph would keep a float32 copy of every weight.
        self.matmul = llava_kernels.MATMUL if precision.kernels else ops.MatMul(transpose_b=True)
        self.cast_weight = not precision.kernels
        self.bias_add = ops.BiasAdd()  # a broadcasting Add over [N, out] is many times slower on CPU (RESULTS.md)
        self.cast = ops.Cast()
        self.sigmoid = ops.Sigmoid()
        self.erf = ops.Erf()

    def construct(self, x):
        """x: [..., in] -> [..., out], in compute_dtype (float32 after "gelu")."""
        leading = x.shape[:-1]
        x = self.cast(x.reshape(-1, x.shape[-1]), self.compute_dtype)
        if self.fused:
            bias = self.bias if self.bias is not None else self.zero_bias
            y = llava_kernels.LINEAR(x, self.weight, bias, self.activation_code)
            return y.reshape(leading + (y.shape[-1],))
        y = self.matmul(x, self.cast(self.weight, self.compute_dtype) if self.cast_weight else self.weight)
        if self.all_reduce is not None:
            y = self.all_reduce(y)
        if self.bias is not None:
            y = self.bias_add(y, self.cast(self.bias, self.compute_dtype))
        if self.activation == "quick_gelu":
            y = y * self.sigmoid(1.702 * y)
        elif self.activation == "gelu":
            y = y.astype(ms.float32)
            y = 0.5 * y * (1.0 + self.erf(y * (2.0 ** -0.5)))
        return y.reshape(leading + (y.shape[-1],))


class Embedding(nn.Cell):
    """A table [num, dim] in the weights dtype; rows come back in float32 (MindSpore's CPU Gather has no
    bfloat16: the kernels look rows up in any dtype)."""

    def __init__(self, num, dim, precision=FLOAT32):
        super().__init__()
        self.weight = _matrix((num, dim), precision.weights)
        self.kernel = precision.kernels
        self.gather = ops.Gather()

    def construct(self, ids):
        if self.kernel:
            return llava_kernels.EMBEDDING(self.weight, ids.astype(ms.int32))
        return self.gather(self.weight, ids, 0).astype(ms.float32)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in float32."""

    def __init__(self, size, eps, precision=FLOAT32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (size,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (size,), ms.float32), name="bias")
        self.kernel = precision.kernels
        self.eps = Tensor([eps], ms.float32)
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        if self.kernel:
            return llava_kernels.LAYER_NORM(x.astype(ms.float32), self.weight, self.bias, self.eps)
        return self.norm(x.astype(ms.float32), self.weight, self.bias)[0]


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, size, eps, precision=FLOAT32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (size,), ms.float32), name="weight")
        self.kernel = precision.kernels
        self.eps = eps
        self.eps_tensor = Tensor([eps], ms.float32)
        self.mean = ops.ReduceMean(keep_dims=True)
        self.rsqrt = ops.Rsqrt()
        self.mul = ops.Mul()

    def construct(self, x):
        x = x.astype(ms.float32)
        if self.kernel:
            return llava_kernels.RMS_NORM(x, self.weight, self.eps_tensor)
        return self.mul(self.mul(x, self.rsqrt(self.mean(self.mul(x, x), -1) + self.eps)), self.weight)


def split_heads(x, num_heads):
    """[B, T, H*D] -> [B, H, T, D]."""
    batch, length, _ = x.shape
    return ops.transpose(x.reshape(batch, length, num_heads, -1), (0, 2, 1, 3))


def merge_heads(x):
    """[B, H, T, D] -> [B, T, H*D]."""
    batch, heads, length, dim = x.shape
    if length == 1:  # one token per row (decode): the same memory order, no transpose to dispatch
        return x.reshape(batch, 1, heads * dim)
    return ops.transpose(x, (0, 2, 1, 3)).reshape(batch, length, heads * dim)


class Attention(nn.Cell):
    """softmax(q k^T * scale + mask) v over [B, H, T, D] inputs, heads merged: [B, T, H*D]; scores and softmax
    in float32."""

    def __init__(self, head_dim, precision=FLOAT32):
        super().__init__()
        self.kernel = precision.kernels
        self.scale = head_dim ** -0.5
        self.scale_tensor = Tensor([self.scale], ms.float32)
        self.half_products = Tensor([int(precision.half_kernels)], ms.int32)  # the kernels' bfloat16 products
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.weighted_sum = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)

    def construct(self, query, key, value, mask=None):
        """query [B,H,T,D], key/value [B,H,L,D], mask (0 or a large negative) [B or 1, 1, T, L] for the kernel,
        which broadcasts it, else [B,H,T,L] (full size: a broadcasting add costs more than the attention itself
        on CPU) or None (MindSpore's ops only: the kernels' unmasked attention is CLIPSelfAttention's)."""
        if self.kernel:  # the kernel writes [B, T, H, D]: no transpose to merge the heads
            batch, heads, length, dim = query.shape
            query, key, value = query.astype(ms.float32), key.astype(ms.float32), value.astype(ms.float32)
            attended = llava_kernels.ATTENTION(query, key, value, mask, self.scale_tensor, self.half_products)
            return attended.reshape(batch, length, heads * dim)
        scores = self.scores(query * self.scale, key).astype(ms.float32)  # scaling q: H*T*D, not H*T*L, products
        if mask is not None:
            scores = scores + mask
        probs = self.softmax(scores).astype(value.dtype)
        return merge_heads(self.weighted_sum(probs, value))

    def after_prefix(self, query, key, value, prefix_key, prefix_value, mask):
        """Prompts that continue one prefix: query, key, value [B,H,T,D] of their own tokens; prefix_key/value
        [1,H,P,D] (the KV cache's dtype), which every row attends to before its own tokens; mask [B or 1, 1, T,
        P+T] -> [B, T, H*D]. The kernel reads the one copy of the prefix for all rows; MindSpore's ops need it
        in every row."""
        if self.kernel:
            batch, heads, length, dim = query.shape
            query, key, value = query.astype(ms.float32), key.astype(ms.float32), value.astype(ms.float32)
            attended = llava_kernels.ATTENTION_AFTER_PREFIX(query, key, value, prefix_key, prefix_value, mask,
                                                            self.scale_tensor, self.half_products)
            return attended.reshape(batch, length, heads * dim)
        rows = (query.shape[0],) + prefix_key.shape[1:]
        key = ops.concat((ops.broadcast_to(prefix_key, rows), key.astype(prefix_key.dtype)), 2)
        value = ops.concat((ops.broadcast_to(prefix_value, rows), value.astype(prefix_value.dtype)), 2)
        return self.construct(query, key, value, mask)

    def with_cache(self, query, key, value, cached_key, cached_value, mask, sharing):
        """One new token per row that attends to the cached positions the mask leaves visible and to itself:
        query, key, value [B,H,1,D]; cached_key/value [B,H,L,D]; mask [B,H,1,L]; sharing [B,2] int32
        (KVCache.sharing: where the kernel reads a row's first positions; the values are the same in every
        row that holds them) -> [B,1,H*D]. The new token's key/value are not in the cache yet (KVCache.write
        puts them there after the step)."""
        if self.kernel:  # float32 q, k, v; the cache float32 or float16; reads only the slots the mask shows
            return merge_heads(llava_kernels.ATTENTION_DECODE(query, key, value, cached_key, cached_value, mask,
                                                              sharing, self.scale_tensor))
        query, key, value = (tensor.astype(cached_key.dtype) for tensor in (query, key, value))
        query = query * self.scale
        cached = self.scores(query, cached_key).astype(ms.float32) + mask
        own = (query * key).sum(-1, keepdims=True).astype(ms.float32)  # [B,H,1,1]
        probs = self.softmax(ops.concat((cached, own), -1)).astype(value.dtype)
        return merge_heads(self.weighted_sum(probs[..., :-1], cached_value) + probs[..., -1:] * value)


# ----------------------------------------------------------------------------------------------------------
# Vision tower: CLIP ViT (pre-LN encoder, quick_gelu MLP)
# ----------------------------------------------------------------------------------------------------------

class CLIPEmbeddings(nn.Cell):
    """Patch embedding as a matmul over flattened patches, plus a class token and learned positions."""

    def __init__(self, config, precision):
        super().__init__()
        hidden = config.hidden_size
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = Parameter(initializer(Normal(0.02), (hidden,), ms.float32), name="class_embedding")
        self.patch_embedding = Linear("patch_embedding", config.num_channels * self.patch_size ** 2, hidden,
                                      bias=False, precision=precision)
        self.position_embedding = Embedding(config.num_patches + 1, hidden, precision)

    def construct(self, pixel_values):
        """pixel_values [N, C, S, S] -> embeddings [N, 1+P, Hv] float32."""
        images, channels = pixel_values.shape[0], pixel_values.shape[1]
        p, g = self.patch_size, self.grid
        # [N, C, g, p, g, p] -> [N, g, g, C, p, p]: each patch flattened in (channel, row, col) order,
        # the order of the conv weight [Hv, C, p, p] that the converter flattened.
        patches = ops.transpose(pixel_values.reshape(images, channels, g, p, g, p), (0, 2, 4, 1, 3, 5))
        patches = self.patch_embedding(patches.reshape(images, g * g, channels * p * p)).astype(ms.float32)
        class_token = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (images, 1, patches.shape[-1]))
        return ops.concat((class_token, patches), axis=1) + self.position_embedding.weight.astype(ms.float32)


class CLIPMLP(nn.Cell):
    def __init__(self, config, precision, tensor_parallel):
        super().__init__()
        self.fc1 = Linear("fc1", config.hidden_size, config.intermediate_size, precision=precision,
                          tensor_parallel=tensor_parallel, activation="quick_gelu")
        self.fc2 = Linear("fc2", config.intermediate_size, config.hidden_size, precision=precision,
                          tensor_parallel=tensor_parallel)

    def construct(self, x):
        return self.fc2(self.fc1(x))


class CLIPSelfAttention(nn.Cell):
    def __init__(self, config, precision, tensor_parallel):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = shard_size(config.num_attention_heads, tensor_parallel.size, "vision attention heads")
        self.q_proj = Linear("q_proj", hidden, hidden, precision=precision, tensor_parallel=tensor_parallel)
        self.k_proj = Linear("k_proj", hidden, hidden, precision=precision, tensor_parallel=tensor_parallel)
        self.v_proj = Linear("v_proj", hidden, hidden, precision=precision, tensor_parallel=tensor_parallel)
        self.out_proj = Linear("out_proj", hidden, hidden, precision=precision, tensor_parallel=tensor_parallel)
        self.attention = Attention(hidden // config.num_attention_heads, precision)
        self.kernel = precision.kernels
        self.heads = Tensor([self.num_heads], ms.int32)

    def construct(self, x):
        """x [N, 1+P, Hv] -> [N, 1+P, Hv]; every token sees every token."""
        if self.kernel:  # the heads split inside the kernel, by strides: no transposes
            attended = llava_kernels.SELF_ATTENTION(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads,
                                                    self.attention.scale_tensor, self.attention.half_products)
        else:
            query = split_heads(self.q_proj(x), self.num_heads)
            key = split_heads(self.k_proj(x), self.num_heads)
            value = split_heads(self.v_proj(x), self.num_heads)
            attended = self.attention(query, key, value)
        return self.out_proj(attended)


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, config, precision, tensor_parallel):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps, precision)
        self.self_attn = CLIPSelfAttention(config, precision, tensor_parallel)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps, precision)
        self.mlp = CLIPMLP(config, precision, tensor_parallel)

    def construct(self, x):
        x = x + self.self_attn(self.layer_norm1(x)).astype(ms.float32)
        return x + self.mlp(self.layer_norm2(x)).astype(ms.float32)


class CLIPVisionTower(nn.Cell):
    """Image -> the hidden state of encoder layer `vision_feature_layer`; later layers are not built."""

    def __init__(self, config, precision, tensor_parallel):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config, precision)
        self.pre_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, precision)
        self.layers = nn.CellList([CLIPEncoderLayer(config, precision, tensor_parallel)
                                   for _ in range(config.num_computed_layers)])
        self.drop_class_token = config.vision_feature_select_strategy == "default"

    def construct(self, pixel_values):
        """pixel_values [N, C, S, S] float32 -> features [N, F, Hv] float32."""
        x = self.pre_layernorm(self.embeddings(pixel_values))
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.drop_class_token else x


class Projector(nn.Cell):
    """Vision features -> text embedding space: linear -> GELU (exact, erf) -> linear."""

    def __init__(self, vision_hidden, text_hidden, precision):
        super().__init__()
        self.linear_1 = Linear("linear_1", vision_hidden, text_hidden, precision=precision, activation="gelu")
        self.linear_2 = Linear("linear_2", text_hidden, text_hidden, precision=precision)

    def construct(self, features):
        return self.linear_2(self.linear_1(features))


# ----------------------------------------------------------------------------------------------------------
# Language model: LLaMA decoder with rotary positions and a static KV cache
# ----------------------------------------------------------------------------------------------------------

def rotary_tables(head_dim, max_positions, theta):
    """cos, sin tables [max_positions, D] (HF's layout: the D/2 frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return Tensor(np.cos(angles), ms.float32), Tensor(np.sin(angles), ms.float32)


def apply_rotary(x, cos, sin):
    """x, cos, sin [B, H, T, D]. Rotates (x1, x2) halves: x*cos + (-x2, x1)*sin."""
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), axis=-1)
    return x * cos + rotated * sin


class KVCache:
    """The keys and values of every decoder layer for `batch` rows (one sequence each) of `length` positions.

    A decode step gets [rows, H, L, D] views of the first rows (`views`, made once per row count) as inputs,
    so a step over fewer rows than the cache holds reads only those (a lone request does not pay for the
    attention of 15 empty rows); the runner writes each step's keys and values between steps (`write`,
    `write_prefix`). Where the buffers live:
    - on CPU ("host"), numpy arrays [R, H, L, D] that the tensors share (Tensor.from_numpy): numpy writes
      them, and a view is a tensor made from a slice of an array, which MindSpore reads in place. MindSpore
      copies a sliced Tensor whole into every op or graph that reads it (a decode step over 8 of 16 rows ~2x
      slower), and its ScatterUpdate copies ~2.4 GB/s (a 15-row prefix write: 250 ms); bench/RESULTS.md,
      serving;
    - elsewhere ("device"), one flat [R*H*L, D] tensor per layer, written in place by an op-by-op
      ScatterUpdate (an in-graph ScatterNdUpdate copies the whole cache at each write: 16 writes into a
      16-row, 1024-position cache took 378 ms on CPU, against 2 ms for ScatterUpdate).

    It allocates, writes, reads a row's first positions back (`read`: a prefix that later prompts continue)
    and says what a decode step may see (`decode_mask`) and which rows hold the same prefix (`sharing`: the
    decode kernel reads it once for all of them); which sequence is in which row, and for how long, is the
    caller's (llava_steps.py). Runtime state, never saved in checkpoints.
    """

    BLOCK = 256  # lengths are multiples of this: each new cache shape costs a compile of the decode step

    def __init__(self, num_layers, num_heads, head_dim, dtype, max_length, host=None):
        """host: keep the buffers in numpy arrays (default: on CPU, for the dtypes numpy has)."""
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.dtype, self.max_length = dtype, max_length
        if host is None:
            host = ms.get_context("device_target") == "CPU" and dtype in (ms.float32, ms.float16)
        self.host = host
        self.buffers = None  # keys of every layer, then values: numpy [R, H, L, D] (host), Tensor [R*H*L, D]
        self._views = {}
        self.batch = self.length = 0
        self.version = 0  # bumped at each allocation: whoever kept views of the older buffers drops them
        self._held = {}  # row -> (prefix tag, P): the row's positions 0..P-1 hold that prefix (read, write_prefix)
        self._tags = 0
        self._scatter = ops.ScatterUpdate()

    def allocate(self, batch, length):
        """Hold at least `batch` rows of `length` positions. A cache that is already large enough is kept, so
        calls with different prompt lengths do not recompile; a new one is rounded up to a multiple of BLOCK
        (capped at the context length) and zeroed."""
        if length > self.max_length:
            raise ValueError(f"{length} tokens do not fit the context seq_length={self.max_length}")
        if self.buffers is not None and self.batch == batch and self.length >= length:
            return
        length = min(-(-length // self.BLOCK) * self.BLOCK, self.max_length)
        if self.host:
            # np.full writes every page now: np.zeros would leave them to fault in at their first write, which
            # would then be a request's (a 15-row prefix write ~2.5x slower).
            shape = (batch, self.num_heads, length, self.head_dim)
            self.buffers = tuple(np.full(shape, 0, ms.dtype_to_nptype(self.dtype)) for _ in range(2 * self.num_layers))
        else:
            flat = (batch * self.num_heads * length, self.head_dim)
            self.buffers = tuple(ops.zeros(flat, self.dtype) for _ in range(2 * self.num_layers))
        self._views, self._held = {}, {}
        self.batch, self.length = batch, length
        self.version += 1

    def views(self, rows):
        """[rows, H, L, D] views (no copy) of the first `rows` rows of every layer's buffers: (keys, values),
        made once per row count."""
        if rows not in self._views:
            if self.host:
                views = tuple(Tensor.from_numpy(buffer[:rows]) for buffer in self.buffers)
            else:
                shape = (rows, self.num_heads, self.length, self.head_dim)
                views = tuple(buffer[:rows * self.num_heads * self.length].reshape(shape) for buffer in self.buffers)
            self._views[rows] = (views[:self.num_layers], views[self.num_layers:])
        return self._views[rows]

    def write(self, rows, start, keys, values):
        """A step's keys and values (per layer [B, H, T, D]) into cache rows `rows` [B], row rows[b] at positions
        start[b]..start[b]+T-1."""
        rows, start = np.asarray(rows, np.int64), np.asarray(start, np.int64)
        for row, first in zip(rows.tolist(), start.tolist()):
            if first < self._held.get(row, (None, 0))[1]:  # over a prefix it held (a freed row's idle decode)
                del self._held[row]
        steps = keys[0].shape[2]
        if self.host:
            for buffer, new in zip(self.buffers, keys + values):
                new = new.asnumpy()
                if steps == 1:  # decode: one position per row, one numpy assignment
                    buffer[rows, :, start] = new[:, :, 0]
                else:
                    for index, (row, first) in enumerate(zip(rows, start)):
                        buffer[row, :, first:first + steps] = new[index]
            return
        index = self._flat_index(rows, start[:, None] + np.arange(steps))
        for buffer, new in zip(self.buffers, keys + values):
            self._scatter(buffer, index, new.reshape(-1, self.head_dim).astype(self.dtype))

    def write_prefix(self, rows, prefix_keys, prefix_values, tag):
        """The same first P positions (per layer [1, H, P, D]: `read`, which gave `tag`) into every row of
        `rows`."""
        length = prefix_keys[0].shape[2]
        if self.host:
            for buffer, prefix in zip(self.buffers, prefix_keys + prefix_values):
                buffer[np.asarray(rows), :, :length] = prefix.asnumpy()  # [1, H, P, D] to every row
        else:
            tiled = tuple(ops.tile(prefix, (len(rows), 1, 1, 1)) for prefix in prefix_keys + prefix_values)
            self.write(rows, np.zeros(len(rows)), tiled[:self.num_layers], tiled[self.num_layers:])
        self._held.update((int(row), (tag, length)) for row in rows)

    def read(self, row, length):
        """The keys and values of positions 0..length-1 of cache row `row`: per layer [1, H, length, D]
        (copies: the row may be overwritten afterwards), and a tag naming them for `write_prefix`."""
        self._tags += 1
        self._held[row] = (self._tags, length)
        if self.host:
            tensors = tuple(Tensor.from_numpy(np.ascontiguousarray(buffer[row:row + 1, :, :length]))
                            for buffer in self.buffers)
        else:
            index = self._flat_index([row], np.arange(length)[None])
            shape = (1, self.num_heads, length, self.head_dim)
            tensors = tuple(ops.gather(buffer, index, 0).reshape(shape) for buffer in self.buffers)
        return tensors[:self.num_layers], tensors[self.num_layers:], self._tags

    def sharing(self, rows):
        """[rows, 2] int32 for a decode step over the first `rows` rows: for a row that holds a prefix, (the
        first of those rows that holds the same one, its length P), else (the row itself, 0). Rows that
        continue one cached prompt start each hold a copy of it; the decode kernel reads one copy for all."""
        table = np.stack([np.arange(rows), np.zeros(rows, np.int64)], 1).astype(np.int32)
        first = {}
        for row in range(rows):
            if row in self._held:
                table[row] = (first.setdefault(self._held[row], row), self._held[row][1])
        return table

    def _flat_index(self, rows, positions):
        """rows [B], positions [B, T] -> int32 Tensor [B*H*T]: the flat buffer row of each (row, head,
        position), in the order of a step's [B, H, T, D] keys (device buffers)."""
        heads = np.arange(self.num_heads, dtype=np.int64)[None, :, None]
        rows = np.asarray(rows, np.int64)[:, None, None]
        index = (rows * self.num_heads + heads) * self.length + np.asarray(positions, np.int64)[:, None, :]
        return Tensor(index.reshape(-1).astype(np.int32))

    def decode_mask(self, positions):
        """positions [B, 1] -> [B, 1, 1, L] float32: a row at position p sees cache slots 0..p-1 (and itself,
        which is not in the cache yet)."""
        visible = np.arange(self.length, dtype=np.int32)[None, :] < positions
        return Tensor(np.where(visible, 0.0, MASK_VALUE).astype(np.float32)[:, None, None, :])


class LlamaAttention(nn.Cell):
    def __init__(self, config, precision, tensor_parallel):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = shard_size(config.num_heads, tensor_parallel.size, "text attention heads")
        self.head_dim = config.head_dim
        parallel = dict(bias=False, precision=precision, tensor_parallel=tensor_parallel)
        self.q_proj = Linear("q_proj", hidden, hidden, **parallel)
        self.k_proj = Linear("k_proj", hidden, hidden, **parallel)
        self.v_proj = Linear("v_proj", hidden, hidden, **parallel)
        self.o_proj = Linear("o_proj", hidden, hidden, **parallel)
        self.attention = Attention(self.head_dim, precision)
        self.kernel = precision.kernels

    def construct(self, x, rotary, mask, cached_key=None, cached_value=None, after_prefix=False, sharing=None):
        """x [B, T, Ht] -> (output [B, T, Ht], this step's keys and values [B, H, T, D], for the KV cache).

        rotary: (cos, sin) [B, H, T, D]; with the kernels (positions [B, T], cos table, sin table [P, D]).
        Three ways to attend:
        - no cache (prompt, training): the T tokens attend to each other (mask [B or 1, 1, T, T]);
        - cached_key, cached_value [B, H, L, D] (decode, T = 1): attend to the cache slots the mask leaves
          visible ([B, 1, 1, L]) and to this token (sharing [B, 2]: see Attention.with_cache);
        - after_prefix: cached_key, cached_value [1, H, P, D] are the first P positions of the prompt every row's
          T tokens continue (a cached prefix, all visible): attend to them and to each other (mask [B or 1, 1, T,
          P + T]).
        """
        if self.kernel:  # the three products, the rotary embedding and the head split in one op
            query, key, value = llava_kernels.QKV_ROTARY(x.astype(ms.float32), self.q_proj.weight,
                                                         self.k_proj.weight, self.v_proj.weight, rotary[0],
                                                         rotary[1], rotary[2])
        else:
            query = apply_rotary(split_heads(self.q_proj(x), self.num_heads), rotary[0], rotary[1])
            key = apply_rotary(split_heads(self.k_proj(x), self.num_heads), rotary[0], rotary[1])
            value = split_heads(self.v_proj(x), self.num_heads)
        if cached_key is None:
            attended = self.attention(query, key, value, mask)
        elif after_prefix:
            attended = self.attention.after_prefix(query, key, value, cached_key, cached_value, mask)
        else:
            attended = self.attention.with_cache(query, key, value, cached_key, cached_value, mask, sharing)
        return self.o_proj(attended), key, value


class LlamaMLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config, precision, tensor_parallel):
        super().__init__()
        parallel = dict(bias=False, precision=precision, tensor_parallel=tensor_parallel)
        self.gate_proj = Linear("gate_proj", config.hidden_size, config.intermediate_size, **parallel)
        self.up_proj = Linear("up_proj", config.hidden_size, config.intermediate_size, **parallel)
        self.down_proj = Linear("down_proj", config.intermediate_size, config.hidden_size, **parallel)
        self.sigmoid = ops.Sigmoid()
        self.kernel = precision.kernels

    def construct(self, x):
        if self.kernel:  # both products and silu(gate) * up in one op
            leading = x.shape[:-1]
            hidden = llava_kernels.SWIGLU(x.reshape(-1, x.shape[-1]).astype(ms.float32), self.gate_proj.weight,
                                          self.up_proj.weight)
            return self.down_proj(hidden.reshape(leading + (hidden.shape[-1],)))
        gate = self.gate_proj(x)
        return self.down_proj(gate * self.sigmoid(gate) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, config, precision, tensor_parallel):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, precision)
        self.self_attn = LlamaAttention(config, precision, tensor_parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, precision)
        self.mlp = LlamaMLP(config, precision, tensor_parallel)

    def construct(self, x, rotary, mask, cached_key=None, cached_value=None, after_prefix=False, sharing=None):
        attended, key, value = self.self_attn(self.input_layernorm(x), rotary, mask, cached_key, cached_value,
                                              after_prefix, sharing)
        x = x + attended.astype(ms.float32)
        return x + self.mlp(self.post_attention_layernorm(x)).astype(ms.float32), key, value


class LlamaModel(nn.Cell):
    """The decoder and its KV cache (allocated on demand by the steps that use it)."""

    def __init__(self, config, max_positions, precision, tensor_parallel):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, precision)
        self.layers = nn.CellList([LlamaDecoderLayer(config, precision, tensor_parallel)
                                   for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, precision)
        self.kernel = precision.kernels
        self.num_heads = shard_size(config.num_heads, tensor_parallel.size, "text attention heads")  # this rank's
        self.kv_cache = KVCache(config.num_layers, self.num_heads, config.head_dim, precision.cache, max_positions)
        self.cos, self.sin = rotary_tables(config.head_dim, max_positions, config.rope_theta)
        self.gather = ops.Gather()

    def construct(self, hidden, positions, mask, cached_keys=None, cached_values=None, after_prefix=False,
                  sharing=None):
        """hidden [B, T, Ht], positions [B, T] int32, mask [B or 1, 1, T, L] -> (normed hidden [B, T, Ht]
        float32, this step's keys and values: per layer [B, H, T, D], for KVCache.write).

        cached_keys, cached_values: per layer [B, H, L, D] (KVCache.views) for a decode step, with sharing
        [B, 2] (KVCache.sharing); with after_prefix, [1, H, P, D], the cached first P positions that every row's
        tokens continue; else None (a whole prompt). See LlamaAttention.
        """
        # Broadcasting elementwise ops are many times slower than same-shape ones on CPU (bench/RESULTS.md), so
        # the rotary tables, and the mask for MindSpore's attention, are tiled to every head once here.
        batch, heads = hidden.shape[0], self.num_heads
        if self.kernel:  # the kernels look the tables up and broadcast the mask themselves
            rotary = (positions, self.cos, self.sin)
        else:
            rotary = (ops.tile(self.gather(self.cos, positions, 0).expand_dims(1), (1, heads, 1, 1)),  # [B,H,T,D]
                      ops.tile(self.gather(self.sin, positions, 0).expand_dims(1), (1, heads, 1, 1)))
            mask = ops.tile(mask, (batch // mask.shape[0], heads, 1, 1))  # [B, H, T, L]
        keys, values = (), ()
        for index, layer in enumerate(self.layers):
            if cached_keys is None:
                hidden, key, value = layer(hidden, rotary, mask)
            else:
                hidden, key, value = layer(hidden, rotary, mask, cached_keys[index], cached_values[index],
                                           after_prefix, sharing)
            keys, values = keys + (key,), values + (value,)
        return self.norm(hidden), keys, values

# ----------------------------------------------------------------------------------------------------------
# LLaVA
# ----------------------------------------------------------------------------------------------------------

def tensor_parallel_of(config):
    """This process' TensorParallel: single device, or its rank in the initialised communication group."""
    size = config.model_parallel
    if size == 1:
        return SINGLE_DEVICE
    from mindspore.communication import get_group_size, get_rank  # pylint: disable=import-outside-toplevel
    try:
        world, rank = get_group_size(), get_rank()
    except RuntimeError as error:
        raise RuntimeError(f"model_parallel={size} needs the distributed launch (msrun, init()): {error}") from error
    if world != size:
        raise ValueError(f"world size {world} != model_parallel {size} x data_parallel 1")
    return TensorParallel(size, rank)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlavaVlm(LlavaGenerationMixin, PreTrainedModel):
    """LLaVA-1.5: each `<image>` id in a prompt is replaced, in order, by one projected image feature.

    Inputs: input_ids int32 [B, S] and pixel_values float32 [N, 3, S_img, S_img], one image per F `<image>`
    ids, in reading order. `generate` (llava_generation.py) runs it with a KV cache through llava_steps.py.
    """

    config_class = LlavaConfig
    base_model_prefix = "llava"

    def __init__(self, config: LlavaConfig, **kwargs):
        super().__init__(config, **kwargs)
        precision = Precision.of(config)
        text = config.text_config
        self.image_token_id = config.image_token_id
        self.num_image_features = config.vision_config.num_image_features
        # Attention and MLP blocks are split across the model-parallel ranks; the embeddings, projector and
        # lm_head (4% of 7B's weights) are replicated, which saves a collective per lookup and an AllGather
        # of the logits at every decode step.
        self.tensor_parallel = tensor_parallel_of(config)
        self.vision_tower = CLIPVisionTower(config.vision_config, precision, self.tensor_parallel)
        self.projector = Projector(config.vision_config.hidden_size, text.hidden_size, precision)
        self.language_model = LlamaModel(text, config.seq_length, precision, self.tensor_parallel)
        self.lm_head = Linear("lm_head", text.hidden_size, text.vocab_size, bias=False, precision=precision)

    def runner(self):
        """The model's ModelRunner (compiled steps and the KV cache they fill; llava_steps.py), made on first use."""
        if "_runner" not in self.__dict__:
            self.__dict__["_runner"] = ModelRunner(self)  # outside the Cell tree: its steps share our cells
        return self.__dict__["_runner"]

    def weights(self):
        """name -> Parameter of everything a checkpoint holds (the KV cache is runtime state, not a Parameter)."""
        return dict(self.parameters_and_names())

    def init_weights(self):
        """Give every matrix not yet loaded fresh N(0, 0.02) values, in the order the model creates them."""
        for parameter in self.weights().values():
            if parameter.is_meta:
                parameter.set_data(initializer(Normal(0.02), parameter.shape, parameter.dtype).init_data())

    def image_features(self, pixel_values):
        """pixel_values [N, C, S, S] -> projected features [N*F, Ht] float32, one row per `<image>` slot."""
        features = self.projector(self.vision_tower(pixel_values)).astype(ms.float32)
        return features.reshape(-1, features.shape[-1])

    def merge_plan(self, input_ids, num_images):
        """Where the image features go in prompts [B, S] (host side, before any device work).

        Returns (text_ids [B, S] with the `<image>` ids zeroed, merge_index [B*S]): position i of the merged
        embeddings takes row merge_index[i] of [text embeddings; image features] (see merge_image_features).
        Raises ValueError unless the prompts hold exactly F `<image>` ids per image.
        """
        ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids, np.int32)
        is_image = ids == self.image_token_id
        image_slots = int(is_image.sum())
        if image_slots != num_images * self.num_image_features:
            raise ValueError(f"the prompts hold {image_slots} <image> tokens but {num_images} image(s) were given; "
                             f"each image needs exactly {self.num_image_features} <image> tokens")
        merge_index = np.arange(ids.size, dtype=np.int32)
        merge_index[is_image.reshape(-1)] = ids.size + np.arange(image_slots, dtype=np.int32)
        return np.where(is_image, 0, ids), merge_index

    def construct(self, input_ids, pixel_values=None):
        """Plain causal forward, op by op, no cache (the reference): logits [B, S, V] float32."""
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        text_ids, merge_index = self.merge_plan(input_ids, num_images)
        batch, length = text_ids.shape
        if pixel_values is not None and not isinstance(pixel_values, Tensor):
            pixel_values = Tensor(pixel_values, ms.float32)
        positions = Tensor(np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)))
        return self.forward_merged(Tensor(text_ids), Tensor(merge_index), pixel_values, positions,
                                   causal_mask(length))

    def forward_merged(self, text_ids, merge_index, pixel_values, positions, mask):
        """The forward once `merge_plan` has run (no host work, so it compiles; the training loss uses it):
        text_ids, positions [B, S] int32, merge_index [B*S] int32, pixel_values [N, C, S_img, S_img] float32 or
        None, mask [1, 1, S, S] -> logits [B, S, V] float32."""
        hidden = self.language_model.embed_tokens(text_ids)
        if pixel_values is not None:
            hidden = merge_image_features(hidden, self.image_features(pixel_values), merge_index)
        return self.lm_head(self.language_model(hidden, positions, mask)[0]).astype(ms.float32)
