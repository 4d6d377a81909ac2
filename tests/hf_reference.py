"""The HuggingFace reference: tiny random `LlavaForConditionalGeneration` models (transformers + torch CPU)
and the three on-disk naming layouts a converter meets."""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
VOCAB_SIZE = 32064  # LLaMA-2's 32000 pieces, <image>, <pad>, padded to a multiple of 64 as in llava-hf

# Two shapes of tiny model: they differ in every size, layer count and the feature layer.
TINY_CONFIGS = {
    "small": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14),
                  text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
                  vision_feature_layer=-2),
    "wide": dict(vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                             image_size=42, patch_size=14),
                 text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6),
                 vision_feature_layer=-3),
}


def make_hf_llava(name="small", seed=0, vocab_size=VOCAB_SIZE, feature_strategy="default", image_size=None):
    """A random tiny LLaVA-1.5 in fp32 with weights large enough that every block matters.

    feature_strategy: "default" (the class token's feature dropped, as LLaVA-1.5) or "full" (kept).
    image_size: another input size than the spec's.
    """
    spec = TINY_CONFIGS[name]
    if image_size is not None:
        spec = dict(spec, vision=dict(spec["vision"], image_size=image_size))
    patches = (spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**spec["vision"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                       projection_dim=spec["vision"]["hidden_size"]),
        text_config=LlamaConfig(**spec["text"], vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0,
                                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                                pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False),
        image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=feature_strategy, projector_hidden_act="gelu",
        image_seq_length=patches + (feature_strategy == "full"),
        pad_token_id=PAD_TOKEN_ID,
    )
    model = LlavaForConditionalGeneration(config).eval()
    # HF's default init (std 0.02, unit norms) makes a tiny model's logits near-uniform, which would let
    # real bugs hide under the tolerance: scale weights so activations and logits are of order one.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param.dim() == 1:
                param.normal_(0.0, 0.1)
            elif "embed" in name:
                param.normal_(0.0, 1.0)
            else:
                fan_in = param[0].numel()
                param.normal_(0.0, 1.5 / fan_in ** 0.5)
    return model


def hub_state_dict(model):
    """Tensors under the hub's names (`language_model.model.*`, `vision_tower.vision_model.*`)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.vision_tower."):
            name = name[len("model."):]
        elif name.startswith("model.multi_modal_projector."):
            name = name[len("model."):]
        elif name.startswith("model.language_model."):
            name = "language_model.model." + name[len("model.language_model."):]
        elif name == "lm_head.weight":
            name = "language_model.lm_head.weight"
        out[name] = tensor.detach().contiguous().clone()
    return out


def layout_state_dict(model, layout):
    """State dict under one of the three spellings: "hub", "in_memory" (transformers 4.5x) or "v5"."""
    if layout == "in_memory":
        return {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    hub = hub_state_dict(model)
    if layout == "hub":
        return hub
    if layout == "v5":
        return {name.replace("vision_tower.vision_model.", "vision_tower."): t for name, t in hub.items()}
    raise ValueError(layout)


def save_hf_checkpoint(model, directory, layout="hub", shards=1, write_config=True):
    """Write `model` as safetensors in `directory`: one file, or `shards` files plus the index json."""
    os.makedirs(directory, exist_ok=True)
    tensors = layout_state_dict(model, layout)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per_shard = -(-len(names) // shards)
        for index in range(shards):
            file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[index * per_shard:(index + 1) * per_shard]}
            save_file(part, os.path.join(directory, file_name), metadata={"format": "pt"})
            weight_map.update({name: file_name for name in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    if write_config:
        model.config.save_pretrained(directory)
    return directory


def hf_llava_from(model):
    """Our LlavaVlm as HF's LlavaForConditionalGeneration in float32: the same config and weight values (every
    name through llava_layout's mapping, the inverse of what the converter reads)."""
    from llava_layout import our_name, split_hf_name, stored_shape_from_hf  # pylint: disable=import-outside-toplevel

    vision, text = model.config.vision_config, model.config.text_config
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                                       num_hidden_layers=vision.num_hidden_layers,
                                       num_attention_heads=vision.num_attention_heads, image_size=vision.image_size,
                                       patch_size=vision.patch_size, hidden_act="quick_gelu",
                                       layer_norm_eps=vision.layer_norm_eps, projection_dim=vision.hidden_size),
        text_config=LlamaConfig(hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                                num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
                                vocab_size=text.vocab_size, rms_norm_eps=text.rms_norm_eps, rope_theta=text.rope_theta,
                                max_position_embeddings=max(4096, model.config.seq_length), bos_token_id=1,
                                eos_token_id=2, tie_word_embeddings=False),
        image_token_index=model.config.image_token_id, vision_feature_layer=vision.vision_feature_layer,
        vision_feature_select_strategy=vision.vision_feature_select_strategy, projector_hidden_act="gelu",
        image_seq_length=vision.num_image_features)
    hf_model = LlavaForConditionalGeneration(config).eval()
    ours = {name: parameter.float().asnumpy() for name, parameter in model.weights().items()}
    state = {}
    for in_memory_name, (hf_name, tensor) in zip(hf_model.state_dict(), hub_state_dict(hf_model).items()):
        name, _ = our_name(*split_hf_name(hf_name), vision.num_computed_layers)
        if name is not None:  # else unused by LLaVA (layers after the feature layer, post_layernorm): HF's init
            assert ours[name].shape == stored_shape_from_hf(name, tuple(tensor.shape)), name
            tensor = torch.from_numpy(ours.pop(name).reshape(tensor.shape))
        state[in_memory_name] = tensor
    assert not ours, f"not exported: {sorted(ours)}"
    hf_model.load_state_dict(state)
    return hf_model
