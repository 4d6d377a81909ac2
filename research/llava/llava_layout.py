"""Where every weight of LlavaVlm lives and how it is stored: the one table that the model, the checkpoint
files, tensor-parallel sharding, the converter and weight initialisation all read.

Every linear weight is stored [out_features, in_features], HuggingFace's order (and MindFormers', and what the
CPU kernels of llava_kernels.py read: one contiguous row per output), so a HuggingFace tensor needs no
transpose. Each linear is one of three kinds (Megatron-style tensor parallelism, see `Linear` in
llava_model.py):

    kind        layers                                    split across ranks
    column      q/k/v_proj, fc1, gate_proj, up_proj       weight axis 0 (outputs), bias axis 0
    row         out_proj, o_proj, fc2, down_proj          weight axis 1 (inputs), bias whole
    replicated  patch_embedding, linear_1/2, lm_head      not split

A row-parallel bias is added once, after the partial sums are all-reduced, so every rank holds all of it.
Everything that is not a linear (norms, embedding tables, the class and position embeddings) is replicated and
stored as HuggingFace stores it, except the patch embedding: HF's conv weight [hidden, channels, p, p] is
stored as the linear map [hidden, channels*p*p] it is.

Checkpoints written by llava-ms carry LAYOUT_VERSION (llava_checkpoint.py); files from before this order
(linear weights once stored [in, out] for a CPU matmul that the kernels have replaced) are refused.
"""
import re
from dataclasses import dataclass

import numpy as np

LAYOUT_VERSION = 2  # 1: column and replicated linears stored [in, out] (up to 2026-11); 2: every linear [out, in]

# --------------------------------------------------------------------------------------------- linear kinds


@dataclass(frozen=True)
class LinearKind:
    """How one kind of linear layer is split across model-parallel ranks."""

    parallel: str  # "column", "row" or "replicated"

    @staticmethod
    def weight_shape(in_features, out_features):
        return (out_features, in_features)

    @property
    def weight_split_axis(self):
        """Axis of the stored weight split across ranks (None: every rank holds all of it)."""
        return {"column": 0, "row": 1}.get(self.parallel)

    @property
    def bias_split_axis(self):
        return 0 if self.parallel == "column" else None


COLUMN = LinearKind("column")
ROW = LinearKind("row")
REPLICATED = LinearKind("replicated")

LINEARS = {
    # CLIP vision tower (q/k/v are named as in the text model)
    "patch_embedding": REPLICATED,
    "q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "out_proj": ROW,
    "fc1": COLUMN, "fc2": ROW,
    # projector
    "linear_1": REPLICATED, "linear_2": REPLICATED,
    # LLaMA decoder
    "o_proj": ROW, "gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW,
    "lm_head": REPLICATED,
}


def linear_kind(parameter_name):
    """The LinearKind of `...<linear>.weight` / `...<linear>.bias`, or None for a parameter of no linear."""
    parts = parameter_name.split(".")
    return LINEARS.get(parts[-2]) if len(parts) >= 2 and parts[-1] in ("weight", "bias") else None


def split_axis(parameter_name):
    """The axis of a stored parameter split across model-parallel ranks, or None when each rank holds it all."""
    kind = linear_kind(parameter_name)
    if kind is None:
        return None
    return kind.weight_split_axis if parameter_name.endswith(".weight") else kind.bias_split_axis


# ------------------------------------------------------------------------------------------- the full layout

def _linear(layout, prefix, in_features, out_features, bias=True):
    kind = LINEARS[prefix.rsplit(".", 1)[-1]]
    layout[f"{prefix}.weight"] = kind.weight_shape(in_features, out_features)
    if bias:
        layout[f"{prefix}.bias"] = (out_features,)


def checkpoint_layout(config):
    """Name -> stored shape of every parameter of `LlavaVlm(config)` on a single device, from the config alone.

    The converter checks HF tensors against it without building the model (a 7B model would not fit a CPU
    host in float32); a test checks it equals the model's own parameters.
    """
    vision, text = config.vision_config, config.text_config
    hidden_v, inner_v, hidden_t, inner_t = (vision.hidden_size, vision.intermediate_size,
                                            text.hidden_size, text.intermediate_size)
    layout = {"vision_tower.embeddings.class_embedding": (hidden_v,)}
    _linear(layout, "vision_tower.embeddings.patch_embedding", vision.num_channels * vision.patch_size ** 2,
            hidden_v, bias=False)
    layout["vision_tower.embeddings.position_embedding.weight"] = (vision.num_patches + 1, hidden_v)
    layout["vision_tower.pre_layernorm.weight"] = (hidden_v,)
    layout["vision_tower.pre_layernorm.bias"] = (hidden_v,)
    for i in range(vision.num_computed_layers):
        prefix = f"vision_tower.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            layout[f"{prefix}{norm}.weight"] = (hidden_v,)
            layout[f"{prefix}{norm}.bias"] = (hidden_v,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(layout, f"{prefix}self_attn.{proj}", hidden_v, hidden_v)
        _linear(layout, f"{prefix}mlp.fc1", hidden_v, inner_v)
        _linear(layout, f"{prefix}mlp.fc2", inner_v, hidden_v)
    _linear(layout, "projector.linear_1", hidden_v, hidden_t)
    _linear(layout, "projector.linear_2", hidden_t, hidden_t)
    layout["language_model.embed_tokens.weight"] = (text.vocab_size, hidden_t)
    for i in range(text.num_layers):
        prefix = f"language_model.layers.{i}."
        layout[f"{prefix}input_layernorm.weight"] = (hidden_t,)
        layout[f"{prefix}post_attention_layernorm.weight"] = (hidden_t,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _linear(layout, f"{prefix}self_attn.{proj}", hidden_t, hidden_t, bias=False)
        _linear(layout, f"{prefix}mlp.gate_proj", hidden_t, inner_t, bias=False)
        _linear(layout, f"{prefix}mlp.up_proj", hidden_t, inner_t, bias=False)
        _linear(layout, f"{prefix}mlp.down_proj", inner_t, hidden_t, bias=False)
    layout["language_model.norm.weight"] = (hidden_t,)
    _linear(layout, "lm_head", hidden_t, text.vocab_size, bias=False)
    return layout


def shard_shape(parameter_name, shape, size):
    """The shape of one rank's slice under `size`-way model parallelism (ValueError if size does not divide)."""
    axis = split_axis(parameter_name)
    if axis is None or size == 1:
        return tuple(shape)
    if shape[axis] % size:
        raise ValueError(f"model_parallel={size} does not divide dimension {axis} ({shape[axis]}) of "
                         f"{parameter_name!r}")
    return tuple(shape[:axis]) + (shape[axis] // size,) + tuple(shape[axis + 1:])


def shard(parameter_name, array, rank, size):
    """Rank `rank`'s slice of the full stored tensor `array` (a view; the array itself when replicated)."""
    axis = split_axis(parameter_name)
    if axis is None or size == 1:
        return array
    length = array.shape[axis] // size
    index = [slice(None)] * array.ndim
    index[axis] = slice(rank * length, (rank + 1) * length)
    return array[tuple(index)]


# ------------------------------------------------------------------------------------ HuggingFace's spelling
#
# The same weights appear under three spellings (hub files, transformers 4.5x `state_dict()`, transformers v5
# saves); each maps to one (part, local name), then to our parameter name.

# Most specific prefix first: `vision_tower.vision_model.` must win over `vision_tower.`.
_HF_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision"),  # transformers 4.5x in memory
    ("vision_tower.vision_model.", "vision"),        # hub files
    ("model.vision_tower.", "vision"),               # transformers v5 in memory
    ("vision_tower.", "vision"),                     # transformers v5 save
    ("model.multi_modal_projector.", "projector"),
    ("multi_modal_projector.", "projector"),
    ("model.language_model.", "text"),
    ("language_model.model.", "text"),
    ("language_model.lm_head.", "head"),
    ("lm_head.", "head"),
)
_HF_VISION_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
HF_TEXT_LAYER = re.compile(r"layers\.(\d+)\.")
PATCH_EMBEDDING = "vision_tower.embeddings.patch_embedding.weight"


def split_hf_name(hf_name):
    """(part, local name) of an HF tensor name in any spelling; part is None for names outside LLaVA."""
    for prefix, part in _HF_PREFIXES:
        if hf_name.startswith(prefix):
            return part, hf_name[len(prefix):]
    return None, hf_name


def hf_vision_layer(local):
    """The encoder layer number of a vision tensor's local name, or None."""
    match = _HF_VISION_LAYER.fullmatch(local)
    return int(match.group(1)) if match else None


def our_name(part, local, num_vision_layers):
    """Our parameter name for an HF tensor: (name, None), or (None, reason) for a tensor LLaVA never uses.

    Names that map but that the model lacks are caught by the layout check, as unexpected tensors.
    """
    if local.endswith("inv_freq") or local.endswith("position_ids"):
        return None, "buffer, recomputed at run time"
    if part == "vision":
        if local.startswith("post_layernorm."):
            return None, "post_layernorm is never used by LLaVA"
        if local.startswith("pre_layrnorm."):  # HF's spelling
            return "vision_tower.pre_layernorm." + local[len("pre_layrnorm."):], None
        layer = _HF_VISION_LAYER.fullmatch(local)
        if layer:
            if int(layer.group(1)) >= num_vision_layers:
                return None, f"vision layer {layer.group(1)} comes after vision_feature_layer"
            return f"vision_tower.layers.{layer.group(1)}.{layer.group(2)}", None
        return "vision_tower." + local, None
    if part == "projector":
        return "projector." + local, None
    if part == "text":
        return "language_model." + local, None
    return "lm_head." + local, None  # part == "head"


def stored_shape_from_hf(name, hf_shape):
    """The stored shape of our parameter `name` whose HF tensor has `hf_shape` (headers checked before reads)."""
    if name == PATCH_EMBEDDING:  # [hidden, channels, p, p] -> [hidden, channels*p*p]
        return (hf_shape[0], int(np.prod(hf_shape[1:]))) if hf_shape else tuple(hf_shape)
    return tuple(hf_shape)


def stored_from_hf(name, array, dtype=None):
    """Our stored array for parameter `name` from its HF tensor: contiguous, numpy `dtype` (None: keep); no copy
    when nothing changes."""
    return np.ascontiguousarray(array.reshape(stored_shape_from_hf(name, array.shape)), dtype=dtype or array.dtype)
