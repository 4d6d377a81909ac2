"""The YAML builds LlavaConfig through MindFormers' registry (auto_register), with the upstream key paths;
the 7B config's checkpoint layout accounts for every tensor of llava-1.5-7b-hf."""
import copy
import json
import os

import numpy as np
import pytest
from mindformers.models.build_config import build_model_config
from mindformers.tools.register import MindFormerConfig

from conftest import PLUGIN, REFERENCE_DIR
from llava_layout import checkpoint_layout
from llava_config import LlavaConfig

YAML_7B = os.path.join(PLUGIN, "llava1_5_7B", "predict_llava1_5_7b.yaml")


@pytest.fixture
def config_7b(monkeypatch):
    monkeypatch.setenv("REGISTER_PATH", PLUGIN)
    return build_model_config(copy.deepcopy(MindFormerConfig(YAML_7B).model.model_config))


def test_7b_yaml_builds_through_the_registry(config_7b):
    assert type(config_7b).__name__ == "LlavaConfig"
    vision, text = config_7b.vision_config, config_7b.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    assert vision.num_image_features == 576 and vision.num_computed_layers == 23
    assert (text.hidden_size, text.num_layers, text.num_heads, text.intermediate_size, text.vocab_size) == \
        (4096, 32, 32, 11008, 32064)
    assert (config_7b.image_token_id, config_7b.pad_token_id, config_7b.eos_token_id) == (32000, 32001, 2)
    assert config_7b.seq_length == 2048 and config_7b.use_past


def test_upstream_text_config_form_is_accepted():
    """Upstream YAMLs give text_config as `type: LlamaConfig` with the keys under model_config."""
    upstream = {"type": "LlamaConfig", "arch": {"type": "LlamaForCausalLM"},
                "model_config": {"type": "LlamaConfig", "hidden_size": 64, "num_layers": 3, "num_heads": 4,
                                 "vocab_size": 300, "intermediate_size": 96, "pad_token_id": 299}}
    config = LlavaConfig(text_config=upstream)
    assert (config.text_config.hidden_size, config.text_config.num_layers, config.text_config.head_dim) == (64, 3, 16)
    assert config.pad_token_id == 299


def test_7b_layout_accounts_for_every_hub_tensor(config_7b):
    with open(os.path.join(REFERENCE_DIR, "hf_llava15_7b_keys.tsv")) as f:
        rows = [line.split("\t") for line in f.read().splitlines() if not line.startswith("#")]
    hub_parameters = sum(int(np.prod(json.loads(shape))) for _, shape, _ in rows)
    layout = checkpoint_layout(config_7b)
    ours = sum(int(np.prod(shape)) for shape in layout.values())
    # Not stored: vision layer 23 (never used with vision_feature_layer -2) and post_layernorm (unused).
    last_layer = [shape for name, shape, _ in rows if ".encoder.layers.23." in name or "post_layernorm" in name]
    assert len(rows) == 686 and hub_parameters == 7_063_427_072
    assert len(layout) == 686 - len(last_layer) == 668
    assert ours == hub_parameters - sum(int(np.prod(json.loads(shape))) for shape in last_layer)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="not divisible"):
        LlavaConfig(text_config={"hidden_size": 100, "num_heads": 3})
    with pytest.raises(ValueError, match="grouped-query"):
        LlavaConfig(text_config={"num_key_value_heads": 8})
    with pytest.raises(ValueError, match="vision_feature_layer"):
        LlavaConfig(vision_config={"num_hidden_layers": 4, "vision_feature_layer": -6})
