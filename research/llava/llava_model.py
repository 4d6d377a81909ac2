"""LLaVA-1.5 in plain MindSpore ops: CLIP ViT vision tower -> 2-layer GELU projector -> LLaMA decoder.

Every op here has a CPU kernel (the fused Ascend kernels of MindFormers' own LLaMA do not), so the same
code runs on CPU in float32 and on Ascend in float16/bfloat16 (`compute_dtype`; norms and softmax stay float32).

Shapes: B batch, S prompt length, T tokens in a step (S at prefill, 1 at decode), L cache length,
H heads, D head dim, N images, P patches per image, F image features per image (P, or P+1 with CLS).

Generation (see `generate`) prefills the whole prompt once, writing keys/values into a static cache
[B, H, L, D], then decodes one token per step; each sequence keeps its own length, so a batch of prompts
of different lengths needs no padding tricks and every row matches the same prompt run alone.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from llava_config import LlavaConfig
from llava_generation import GenerationLoop

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_MASK_VALUE = -1e9  # finite: fully masked padding rows must not produce NaN
KV_CACHE_BLOCK = 256  # cache lengths are multiples of this (see LlavaVlm.allocate_kv_cache)
PREFILL_BLOCK = 32  # prefill lengths are padded to multiples of this (see LlavaVlm.prefill)


def mindspore_dtype(name):
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


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


class Linear(nn.Cell):
    """y = x @ W (+ bias).

    parallel: None (replicated), "column" (this rank's out_features/size outputs) or "row" (this rank's
    in_features/size inputs; partial results are summed across ranks before the bias).

    Storage follows the CPU matmul's measured speed for a single decode token (x [1, in]): W as [in, out]
    for most linears, but the row-parallel ones (o_proj, down_proj, out_proj, fc2: outputs back to the
    hidden size) as [out, in] with a transposed matmul: the bench decoder's decode step took 37 ms instead of
    42 ms per token (its matmuls alone 26 instead of 33 ms). Large prompts run at the same speed either way.
    """

    def __init__(self, in_features, out_features, bias=True, compute_dtype=ms.float32, param_dtype=ms.float32,
                 parallel=None, tensor_parallel=SINGLE_DEVICE):
        super().__init__()
        size = tensor_parallel.size
        if parallel == "column":
            out_features = _shard_size(out_features, size, "output features")
        elif parallel == "row":
            in_features = _shard_size(in_features, size, "input features")
        self.transposed = parallel == "row"
        shape = (out_features, in_features) if self.transposed else (in_features, out_features)
        self.weight = Parameter(initializer(Normal(0.02), shape, param_dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), param_dtype), name="bias") if bias else None
        self.compute_dtype = compute_dtype
        self.all_reduce = ops.AllReduce() if parallel == "row" and size > 1 else None
        self.matmul = ops.MatMul(transpose_b=self.transposed)
        self.bias_add = ops.BiasAdd()  # a broadcasting Add over [N, out] is ~10x slower on CPU (measured)
        self.cast = ops.Cast()

    def construct(self, x):
        """x: [..., in] -> [..., out], in compute_dtype."""
        leading = x.shape[:-1]
        x = self.cast(x.reshape(-1, x.shape[-1]), self.compute_dtype)
        y = self.matmul(x, self.cast(self.weight, self.compute_dtype))
        if self.all_reduce is not None:
            y = self.all_reduce(y)
        if self.bias is not None:
            y = self.bias_add(y, self.cast(self.bias, self.compute_dtype))
        return y.reshape(leading + (y.shape[-1],))


def _shard_size(total, size, what):
    if total % size:
        raise ValueError(f"model_parallel={size} does not divide the {total} {what}")
    return total // size


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in float32."""

    def __init__(self, size, eps):
        super().__init__()
        self.weight = Parameter(initializer("ones", (size,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (size,), ms.float32), name="bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        return self.norm(x.astype(ms.float32), self.weight, self.bias)[0]


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, size, eps):
        super().__init__()
        self.weight = Parameter(initializer("ones", (size,), ms.float32), name="weight")
        self.eps = eps
        self.mean = ops.ReduceMean(keep_dims=True)
        self.rsqrt = ops.Rsqrt()
        self.mul = ops.Mul()

    def construct(self, x):
        x = x.astype(ms.float32)
        return self.mul(self.mul(x, self.rsqrt(self.mean(self.mul(x, x), -1) + self.eps)), self.weight)


def split_heads(x, num_heads):
    """[B, T, H*D] -> [B, H, T, D]."""
    batch, length, _ = x.shape
    return ops.transpose(x.reshape(batch, length, num_heads, -1), (0, 2, 1, 3))


def merge_heads(x):
    """[B, H, T, D] -> [B, T, H*D]."""
    batch, heads, length, dim = x.shape
    return ops.transpose(x, (0, 2, 1, 3)).reshape(batch, length, heads * dim)


class Attention(nn.Cell):
    """softmax(q k^T * scale + mask) v over [B, H, T, D] inputs; scores and softmax in float32."""

    def __init__(self, head_dim):
        super().__init__()
        self.scale = head_dim ** -0.5
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.weighted_sum = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)

    def construct(self, query, key, value, mask=None):
        """query [B,H,T,D], key/value [B,H,L,D], mask [B,H,T,L] (0 or a large negative; full size, as a
        broadcasting add costs more than the attention itself on CPU)."""
        scores = self.scores(query * self.scale, key).astype(ms.float32)
        if mask is not None:
            scores = scores + mask
        probs = self.softmax(scores).astype(value.dtype)
        return self.weighted_sum(probs, value)


# ----------------------------------------------------------------------------------------------------------
# Vision tower: CLIP ViT (pre-LN encoder, quick_gelu MLP)
# ----------------------------------------------------------------------------------------------------------

class CLIPEmbeddings(nn.Cell):
    """Patch embedding as a matmul over flattened patches, plus a class token and learned positions."""

    def __init__(self, config, compute_dtype):
        super().__init__()
        hidden = config.hidden_size
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = Parameter(initializer(Normal(0.02), (hidden,), ms.float32), name="class_embedding")
        self.patch_embedding = Linear(config.num_channels * self.patch_size ** 2, hidden, bias=False,
                                      compute_dtype=compute_dtype)
        self.position_embedding = nn.Cell()
        self.position_embedding.weight = Parameter(
            initializer(Normal(0.02), (config.num_patches + 1, hidden), ms.float32), name="weight")

    def construct(self, pixel_values):
        """pixel_values [N, C, S, S] -> embeddings [N, 1+P, Hv]."""
        images, channels = pixel_values.shape[0], pixel_values.shape[1]
        p, g = self.patch_size, self.grid
        # [N, C, g, p, g, p] -> [N, g, g, C, p, p]: each patch flattened in (channel, row, col) order,
        # the order of the conv weight [Hv, C, p, p] that the converter flattened.
        patches = ops.transpose(pixel_values.reshape(images, channels, g, p, g, p), (0, 2, 4, 1, 3, 5))
        patches = self.patch_embedding(patches.reshape(images, g * g, channels * p * p)).astype(ms.float32)
        class_token = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (images, 1, patches.shape[-1]))
        return ops.concat((class_token, patches), axis=1) + self.position_embedding.weight


class CLIPMLP(nn.Cell):
    def __init__(self, config, compute_dtype, tensor_parallel):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, compute_dtype=compute_dtype,
                          parallel="column", tensor_parallel=tensor_parallel)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, compute_dtype=compute_dtype,
                          parallel="row", tensor_parallel=tensor_parallel)
        self.sigmoid = ops.Sigmoid()

    def construct(self, x):
        x = self.fc1(x)
        return self.fc2(x * self.sigmoid(1.702 * x))  # quick_gelu


class CLIPSelfAttention(nn.Cell):
    def __init__(self, config, compute_dtype, tensor_parallel):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = _shard_size(config.num_attention_heads, tensor_parallel.size, "vision attention heads")
        column = dict(compute_dtype=compute_dtype, parallel="column", tensor_parallel=tensor_parallel)
        self.q_proj = Linear(hidden, hidden, **column)
        self.k_proj = Linear(hidden, hidden, **column)
        self.v_proj = Linear(hidden, hidden, **column)
        self.out_proj = Linear(hidden, hidden, compute_dtype=compute_dtype, parallel="row",
                               tensor_parallel=tensor_parallel)
        self.attention = Attention(hidden // config.num_attention_heads)

    def construct(self, x):
        """x [N, 1+P, Hv] -> [N, 1+P, Hv]; every token sees every token."""
        query = split_heads(self.q_proj(x), self.num_heads)
        key = split_heads(self.k_proj(x), self.num_heads)
        value = split_heads(self.v_proj(x), self.num_heads)
        return self.out_proj(merge_heads(self.attention(query, key, value)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, config, compute_dtype, tensor_parallel):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = CLIPSelfAttention(config, compute_dtype, tensor_parallel)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = CLIPMLP(config, compute_dtype, tensor_parallel)

    def construct(self, x):
        x = x + self.self_attn(self.layer_norm1(x)).astype(ms.float32)
        return x + self.mlp(self.layer_norm2(x)).astype(ms.float32)


class CLIPVisionTower(nn.Cell):
    """Image -> the hidden state of encoder layer `vision_feature_layer`; later layers are not built."""

    def __init__(self, config, compute_dtype, tensor_parallel):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config, compute_dtype)
        self.pre_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.layers = nn.CellList([CLIPEncoderLayer(config, compute_dtype, tensor_parallel)
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

    def __init__(self, vision_hidden, text_hidden, compute_dtype):
        super().__init__()
        self.linear_1 = Linear(vision_hidden, text_hidden, compute_dtype=compute_dtype)
        self.linear_2 = Linear(text_hidden, text_hidden, compute_dtype=compute_dtype)
        self.erf = ops.Erf()

    def construct(self, features):
        x = self.linear_1(features).astype(ms.float32)
        x = 0.5 * x * (1.0 + self.erf(x * (2.0 ** -0.5)))
        return self.linear_2(x)


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


class LlamaAttention(nn.Cell):
    def __init__(self, config, compute_dtype, tensor_parallel):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = _shard_size(config.num_heads, tensor_parallel.size, "text attention heads")
        self.head_dim = config.head_dim
        column = dict(bias=False, compute_dtype=compute_dtype, parallel="column", tensor_parallel=tensor_parallel)
        self.q_proj = Linear(hidden, hidden, **column)
        self.k_proj = Linear(hidden, hidden, **column)
        self.v_proj = Linear(hidden, hidden, **column)
        self.o_proj = Linear(hidden, hidden, bias=False, compute_dtype=compute_dtype, parallel="row",
                             tensor_parallel=tensor_parallel)
        self.attention = Attention(self.head_dim)
        self.write_cache = ops.ScatterNdUpdate()
        self.key_cache = None
        self.value_cache = None
        self.cache_dtype = compute_dtype

    def allocate_cache(self, batch, length):
        """A zeroed key and value cache [B, H, L, D] (runtime state: never saved in checkpoints)."""
        shape = (batch, self.num_heads, length, self.head_dim)
        self.key_cache = Parameter(ops.zeros(shape, self.cache_dtype), name="key_cache", requires_grad=False)
        self.value_cache = Parameter(ops.zeros(shape, self.cache_dtype), name="value_cache", requires_grad=False)

    def construct(self, x, cos, sin, mask, cache_index=None, attend_to_cache=False):
        """x [B, T, Ht] -> [B, T, Ht].

        cache_index [B*H*T, 3] int32: (batch, head, position) where this step's keys/values are written,
            or None to run without cache (training, plain forward).
        attend_to_cache: attend over the whole cache [B, H, L, D] (decode) instead of this step's keys.
        """
        query = apply_rotary(split_heads(self.q_proj(x), self.num_heads), cos, sin)
        key = apply_rotary(split_heads(self.k_proj(x), self.num_heads), cos, sin)
        value = split_heads(self.v_proj(x), self.num_heads)
        if cache_index is not None:
            key = key.astype(self.cache_dtype)
            value = value.astype(self.cache_dtype)
            self.write_cache(self.key_cache, cache_index, key.reshape(-1, self.head_dim))
            self.write_cache(self.value_cache, cache_index, value.reshape(-1, self.head_dim))
            if attend_to_cache:
                key, value = self.key_cache, self.value_cache
        query = query.astype(key.dtype)
        return self.o_proj(merge_heads(self.attention(query, key, value, mask)))


class LlamaMLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config, compute_dtype, tensor_parallel):
        super().__init__()
        column = dict(bias=False, compute_dtype=compute_dtype, parallel="column", tensor_parallel=tensor_parallel)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, **column)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, **column)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False, compute_dtype=compute_dtype,
                                parallel="row", tensor_parallel=tensor_parallel)
        self.sigmoid = ops.Sigmoid()

    def construct(self, x):
        gate = self.gate_proj(x)
        return self.down_proj(gate * self.sigmoid(gate) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, config, compute_dtype, tensor_parallel):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, compute_dtype, tensor_parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, compute_dtype, tensor_parallel)

    def construct(self, x, cos, sin, mask, cache_index=None, attend_to_cache=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_index, attend_to_cache).astype(ms.float32)
        return x + self.mlp(self.post_attention_layernorm(x)).astype(ms.float32)


class LlamaModel(nn.Cell):
    def __init__(self, config, max_positions, compute_dtype, tensor_parallel):
        super().__init__()
        self.embed_tokens = nn.Cell()
        self.embed_tokens.weight = Parameter(
            initializer(Normal(0.02), (config.vocab_size, config.hidden_size), ms.float32), name="weight")
        self.layers = nn.CellList([LlamaDecoderLayer(config, compute_dtype, tensor_parallel)
                                   for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cos, self.sin = rotary_tables(config.head_dim, max_positions, config.rope_theta)
        self.gather = ops.Gather()

    def embed(self, input_ids):
        """input_ids [B, S] int32 -> [B, S, Ht] float32."""
        return self.gather(self.embed_tokens.weight, input_ids, 0).astype(ms.float32)

    def construct(self, hidden, positions, mask, cache_index=None, attend_to_cache=False):
        """hidden [B, T, Ht], positions [B, T] int32, mask [B or 1, 1, T, L] -> normed hidden [B, T, Ht] float32."""
        # Broadcasting elementwise ops are slow on CPU (an attention mask add over [1, 16, 640, 640]: 73 ms
        # broadcast, 1.6 ms same-shape), so the mask and rotary tables are tiled to every head once here.
        batch, heads = hidden.shape[0], self.layers[0].self_attn.num_heads
        cos = ops.tile(self.gather(self.cos, positions, 0).expand_dims(1), (1, heads, 1, 1))  # [B, H, T, D]
        sin = ops.tile(self.gather(self.sin, positions, 0).expand_dims(1), (1, heads, 1, 1))
        mask = ops.tile(mask, (batch // mask.shape[0], heads, 1, 1))  # [B, H, T, L]
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, cache_index, attend_to_cache)
        return self.norm(hidden)


# ----------------------------------------------------------------------------------------------------------
# Compiled inference steps
#
# Op-by-op dispatch, not arithmetic, bounds speed on CPU: compiled as graphs, the vision tower ran 1.4x faster
# than op by op (at the GEMM-only graph's speed) and the decode step near memory bandwidth. Each step compiles
# once per input shape: the vision step per image count, the prefill per (batch, prompt length rounded up to
# PREFILL_BLOCK), the decode per cache shape. They share the model's cells, so they see its weights and KV
# cache. On CPU, MindSpore keeps every activation of a compiled graph allocated (measured: +2.7 GB for the
# ViT-L tower, +1.6 GB for a 600-token prefill of the benchmark decoder), hence `compile_prefill: False`,
# which runs the vision and prefill steps op by op (`run`) and compiles only the decode step.
# ----------------------------------------------------------------------------------------------------------

def merge_image_features(text_embeddings, image_features, source_index):
    """[B, S, Ht] token embeddings, [M, Ht] image features -> [B, S, Ht] where position i holds row
    source_index[i] of [text embeddings (flattened); image features]: one gather, no data-dependent op."""
    batch, length, hidden = text_embeddings.shape
    table = ops.concat((text_embeddings.reshape(batch * length, hidden), image_features), axis=0)
    return ops.gather(table, source_index, 0).reshape(batch, length, hidden)


def projected_image_features(vision_tower, projector, pixel_values):
    """pixel_values [N, C, S, S] -> projected features [N*F, Ht] float32, one row per `<image>` slot."""
    features = projector(vision_tower(pixel_values)).astype(ms.float32)
    return features.reshape(-1, features.shape[-1])


class VisionStep(nn.Cell):
    def __init__(self, vision_tower, projector):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector

    def run(self, pixel_values):
        """pixel_values [N, C, S, S] -> projected features [N*F, Ht] float32 (op by op)."""
        return projected_image_features(self.vision_tower, self.projector, pixel_values)

    @ms.jit
    def construct(self, pixel_values):
        return self.run(pixel_values)


class PrefillStep(nn.Cell):
    def __init__(self, language_model, lm_head):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head

    def run(self, text_ids, image_features, source_index, positions, mask, last_index, cache_index=None):
        """text_ids, positions [B, S] int32; image_features [M, Ht]; source_index [B*S]; last_index [B]
        (flat index of each row's last token); cache_index [B*H*S, 3] or None -> logits [B, V] float32."""
        batch, length = text_ids.shape
        hidden = merge_image_features(self.language_model.embed(text_ids), image_features, source_index)
        hidden = self.language_model(hidden, positions, mask, cache_index)
        last = ops.gather(hidden.reshape(batch * length, -1), last_index, 0)
        return self.lm_head(last).astype(ms.float32)

    @ms.jit
    def construct(self, text_ids, image_features, source_index, positions, mask, last_index, cache_index=None):
        return self.run(text_ids, image_features, source_index, positions, mask, last_index, cache_index)


class DecodeStep(nn.Cell):
    def __init__(self, language_model, lm_head):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head

    # jit_level O1 (MindSpore's graph fusion passes): decode step 43 -> 38 ms median at bench size (10 runs
    # alternating with O0).
    @ms.jit(jit_level="O1")
    def construct(self, token_ids, positions, mask, cache_index):
        """token_ids, positions [B, 1] int32; mask [B, 1, 1, L]; cache_index [B*H, 3] -> logits [B, V]."""
        hidden = self.language_model(self.language_model.embed(token_ids), positions, mask, cache_index, True)
        return self.lm_head(hidden[:, 0]).astype(ms.float32)


def causal_mask(length):
    """[1, 1, S, S] float32: 0 on and below the diagonal, a large negative above."""
    return Tensor(np.triu(np.full((length, length), _MASK_VALUE, np.float32), 1)[None, None])


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
class LlavaVlm(GenerationLoop, PreTrainedModel):
    """LLaVA-1.5: each `<image>` id in a prompt is replaced, in order, by one projected image feature.

    Inputs everywhere: input_ids int32 [B, S] (right-padded; `valid_length` [B] gives each row's length)
    and pixel_values float32 [N, 3, S_img, S_img], one image per F `<image>` ids, in reading order.
    """

    config_class = LlavaConfig
    base_model_prefix = "llava"

    def __init__(self, config: LlavaConfig, **kwargs):
        super().__init__(config, **kwargs)
        compute_dtype = mindspore_dtype(config.compute_dtype)
        text = config.text_config
        self.image_token_id = config.image_token_id
        self.num_image_features = config.vision_config.num_image_features
        # Attention and MLP blocks are split across the model-parallel ranks; the embeddings, projector and
        # lm_head (4% of 7B's weights) are replicated, which saves a collective per lookup and an AllGather
        # of the logits at every decode step.
        self.tensor_parallel = tensor_parallel_of(config)
        self.vision_tower = CLIPVisionTower(config.vision_config, compute_dtype, self.tensor_parallel)
        self.projector = Projector(config.vision_config.hidden_size, text.hidden_size, compute_dtype)
        self.language_model = LlamaModel(text, config.seq_length, compute_dtype, self.tensor_parallel)
        self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False, compute_dtype=compute_dtype)
        # Matrices (linear weights, embedding tables) are stored in param_init_type; vectors (norm weights,
        # biases, the class token) stay float32, as the norms compute in float32.
        param_dtype = mindspore_dtype(config.param_init_type)
        for parameter in self.get_parameters():
            if parameter.ndim == 2 and parameter.dtype != param_dtype:
                parameter.set_dtype(param_dtype)
        self._set_step("_vision_step", VisionStep(self.vision_tower, self.projector))
        self._set_step("_prefill_without_cache", PrefillStep(self.language_model, self.lm_head))

    # -- building blocks ---------------------------------------------------------------------------------

    def image_features(self, pixel_values):
        """pixel_values [N, C, S, S] -> projected features [N*F, Ht] float32 (op by op; for training)."""
        return projected_image_features(self.vision_tower, self.projector, pixel_values)

    def plan_prompt(self, input_ids, pixel_values):
        """Host-side merge plan for prompts [B, S]: (text ids with `<image>` ids zeroed, source index [B*S]).

        Position i of the merged embeddings takes row source[i] of [text embeddings; image features]: the
        prompt is known on the host, so finding the image slots needs no data-dependent device op.
        """
        ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids, np.int32)
        is_image = ids == self.image_token_id
        image_slots = int(is_image.sum())
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if image_slots != images * self.num_image_features:
            raise ValueError(f"the prompts hold {image_slots} <image> tokens but {images} image(s) were given; "
                             f"each image needs exactly {self.num_image_features} <image> tokens")
        source = np.arange(ids.size, dtype=np.int32)
        source[is_image.reshape(-1)] = ids.size + np.arange(image_slots, dtype=np.int32)
        return np.where(is_image, 0, ids), source

    # -- forward passes ----------------------------------------------------------------------------------

    def construct(self, input_ids, pixel_values=None):
        """Plain causal forward, op by op, no cache (training, reference): logits [B, S, V] float32."""
        text_ids, source = self.plan_prompt(input_ids, pixel_values)
        batch, length = text_ids.shape
        if pixel_values is not None and not isinstance(pixel_values, Tensor):
            pixel_values = Tensor(pixel_values, ms.float32)
        positions = Tensor(np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)))
        return self.planned_forward(Tensor(text_ids), Tensor(source), pixel_values, positions, causal_mask(length))

    def planned_forward(self, text_ids, source, pixel_values, positions, mask):
        """The forward after `plan_prompt` (compilable: no host work): text_ids, positions [B, S] int32, source
        [B*S] int32, pixel_values [N, C, S_img, S_img] float32 or None, mask [1, 1, S, S] -> logits [B, S, V]."""
        hidden = self.language_model.embed(text_ids)
        if pixel_values is not None:
            hidden = merge_image_features(hidden, self.image_features(pixel_values), source)
        return self.lm_head(self.language_model(hidden, positions, mask)).astype(ms.float32)

    def prefill(self, input_ids, valid_length, pixel_values=None, use_cache=True):
        """Run right-padded prompts [B, S] once, compiled; logits of each row's last token [B, V].

        With `use_cache` the keys/values go into the cache for `decode` (padding slots >= valid_length are
        written too; decode overwrites or masks each before reading it); without it nothing is kept.
        """
        input_ids = np.asarray(input_ids, np.int32)
        batch, length = input_ids.shape
        # Rounding the length up bounds the number of compiled prefill graphs; the extra slots are padding.
        padded_length = -(-length // PREFILL_BLOCK) * PREFILL_BLOCK
        if use_cache:
            padded_length = max(length, min(padded_length, self.language_model.layers[0].self_attn.key_cache.shape[2]))
        padded = np.full((batch, padded_length), self.config.pad_token_id, np.int32)
        padded[:, :length] = input_ids
        text_ids, source = self.plan_prompt(padded, pixel_values)
        if pixel_values is None:
            image_features = ops.zeros((1, self.config.text_config.hidden_size), ms.float32)  # never gathered
        else:
            if not isinstance(pixel_values, Tensor):
                pixel_values = Tensor(np.asarray(pixel_values, np.float32))
            vision_step = self._vision_step if self.config.compile_prefill else self._vision_step.run
            image_features = vision_step(pixel_values)
        positions = np.broadcast_to(np.arange(padded_length, dtype=np.int32), (batch, padded_length))
        last = np.asarray(valid_length, np.int32) - 1 + np.arange(batch, dtype=np.int32) * padded_length
        cache_index = self._cache_index(positions) if use_cache else None
        step = self._prefill_step if use_cache else self._prefill_without_cache
        step = step if self.config.compile_prefill else step.run
        return step(Tensor(text_ids), image_features, Tensor(source), Tensor(positions), causal_mask(padded_length),
                    Tensor(last), cache_index)

    def decode(self, token_ids, positions):
        """One compiled step: token_ids [B] at positions [B] (each row's own) -> logits [B, V]."""
        positions = np.asarray(positions, np.int32).reshape(-1, 1)
        cache_length = self.language_model.layers[0].self_attn.key_cache.shape[2]
        # Key slot j is visible to a row at position p when j <= p.
        visible = np.arange(cache_length, dtype=np.int32)[None, :] <= positions
        mask = Tensor(np.where(visible, 0.0, _MASK_VALUE).astype(np.float32)[:, None, None, :])
        token_ids = Tensor(np.asarray(token_ids, np.int32).reshape(-1, 1))
        return self._decode_step(token_ids, Tensor(positions), mask, self._cache_index(positions))

    def _cache_index(self, positions):
        """positions [B, T] -> scatter indices [B*H*T, 3] of (batch, head, position), the cache's order."""
        batch, steps = positions.shape
        heads = self.language_model.layers[0].self_attn.num_heads  # this rank's heads
        index = np.empty((batch, heads, steps, 3), np.int32)
        index[..., 0] = np.arange(batch, dtype=np.int32)[:, None, None]
        index[..., 1] = np.arange(heads, dtype=np.int32)[None, :, None]
        index[..., 2] = positions[:, None, :]
        return Tensor(index.reshape(-1, 3))

    def allocate_kv_cache(self, batch, length):
        """Make the cache hold `batch` rows of at least `length` tokens.

        Lengths are rounded up to a multiple of KV_CACHE_BLOCK (capped at seq_length) and a cache that is
        already long enough is kept: each new cache shape costs a compile of the decode step, and calls with
        different prompt lengths or max_new_tokens would otherwise pay it again and again.
        """
        if length > self.config.seq_length:
            raise ValueError(f"{length} tokens do not fit the context seq_length={self.config.seq_length}")
        first = self.language_model.layers[0].self_attn
        if first.key_cache is not None and first.key_cache.shape[0] == batch and first.key_cache.shape[2] >= length:
            return
        length = min(-(-length // KV_CACHE_BLOCK) * KV_CACHE_BLOCK, self.config.seq_length)
        for layer in self.language_model.layers:
            layer.self_attn.allocate_cache(batch, length)
        # New steps for the new cache Parameters (each compiles on first use).
        self._set_step("_prefill_step", PrefillStep(self.language_model, self.lm_head))
        self._set_step("_decode_step", DecodeStep(self.language_model, self.lm_head))

    def _set_step(self, name, step):
        """Keep a compiled step outside the Cell tree, so its shared sub-cells are not listed twice."""
        self.__dict__[name] = step

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": Tensor(input_ids, ms.int32)}
