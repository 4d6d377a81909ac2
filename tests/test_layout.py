"""llava_layout: the storage order and tensor-parallel split of every weight, and HF's tensors into that order."""
import numpy as np
import pytest

from llava_config import LlavaConfig
from llava_layout import (PATCH_EMBEDDING, checkpoint_layout, our_name, shard, shard_shape, split_axis,
                          split_hf_name, stored_from_hf, stored_shape_from_hf)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("name", [
    "language_model.layers.0.self_attn.q_proj.weight", "vision_tower.layers.3.mlp.fc1.weight",
    "projector.linear_2.weight", "lm_head.weight", "language_model.layers.0.mlp.down_proj.weight",
    "vision_tower.layers.0.self_attn.out_proj.weight", "language_model.embed_tokens.weight",
    "vision_tower.embeddings.position_embedding.weight",
])
def test_hf_matrices_are_stored_as_hf_has_them(name):
    hf = RNG.standard_normal((6, 10)).astype(np.float16)
    stored = stored_from_hf(name, hf)
    assert stored.flags.c_contiguous and stored.shape == stored_shape_from_hf(name, hf.shape) == (6, 10)
    np.testing.assert_array_equal(stored, hf)
    assert stored_from_hf(name, hf, np.float32).dtype == np.float32


def test_patch_embedding_is_the_flattened_conv():
    hf = RNG.standard_normal((8, 3, 2, 2)).astype(np.float32)  # [hidden, channels, p, p]
    stored = stored_from_hf(PATCH_EMBEDDING, hf)
    assert stored.shape == stored_shape_from_hf(PATCH_EMBEDDING, hf.shape) == (8, 12)
    np.testing.assert_array_equal(stored[5], hf[5].reshape(-1))  # (channel, row, col) order


@pytest.mark.parametrize("name, axis", [
    ("language_model.layers.1.self_attn.k_proj.weight", 0), ("vision_tower.layers.0.self_attn.q_proj.bias", 0),
    ("language_model.layers.1.mlp.down_proj.weight", 1), ("vision_tower.layers.0.mlp.fc2.bias", None),
    ("projector.linear_1.weight", None), ("lm_head.weight", None), ("language_model.norm.weight", None),
])
def test_split_axes(name, axis):
    assert split_axis(name) == axis


def test_column_shards_split_outputs_and_row_shards_split_inputs():
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    column = RNG.standard_normal((6, 8)).astype(np.float32)  # [out, in]
    row = RNG.standard_normal((8, 6)).astype(np.float32)     # [out, in]
    name_c, name_r = "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"
    outputs = [x @ shard(name_c, column, rank, 2).T for rank in range(2)]
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), x @ column.T, rtol=1e-6)
    h = RNG.standard_normal((3, 6)).astype(np.float32)
    halves = [h[:, 3 * rank:3 * rank + 3] @ shard(name_r, row, rank, 2).T for rank in range(2)]
    np.testing.assert_allclose(sum(halves), h @ row.T, rtol=1e-5)  # partial sums, all-reduced
    with pytest.raises(ValueError, match="does not divide dimension 1 \\(6\\) of 'layers.0.mlp.down_proj.weight'"):
        shard_shape(name_r, row.shape, 4)


def test_every_hf_spelling_maps_to_the_layout():
    config = LlavaConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                            num_attention_heads=2, image_size=28, patch_size=14),
                         text_config=dict(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                                          vocab_size=50))
    layout = checkpoint_layout(config)
    for hf_name in ("vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight",
                    "model.vision_tower.vision_model.pre_layrnorm.bias", "vision_tower.embeddings.class_embedding",
                    "model.multi_modal_projector.linear_1.bias", "language_model.model.layers.1.mlp.up_proj.weight",
                    "model.language_model.norm.weight", "language_model.lm_head.weight", "lm_head.weight"):
        name, reason = our_name(*split_hf_name(hf_name), config.vision_config.num_computed_layers)
        assert reason is None and name in layout, hf_name
    skipped = [our_name(*split_hf_name(hf_name), 2)[1] for hf_name in (
        "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight", "vision_tower.vision_model.post_layernorm.weight",
        "language_model.model.layers.0.self_attn.rotary_emb.inv_freq")]
    assert all(skipped)
    assert split_hf_name("text_model.embeddings.weight")[0] is None
