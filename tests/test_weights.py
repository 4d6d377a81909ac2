"""llava_weights: an HF folder loads as it is, in any naming layout, into the same weights as the converted
`.ckpt` and safetensors, and gives HF's greedy tokens; parameters take the file's data in their own dtype;
bad folders, foreign or damaged files get one clear error naming what is wrong."""
import json
import os
import shutil

import numpy as np
import pytest

import mindspore as ms

from convert_weight import convert_llava
from hf_reference import make_hf_llava, save_hf_checkpoint
from llava_checkpoint import CheckpointError, CheckpointWriter, iter_checkpoint
from llava_model import LlavaVlm
from llava_weights import HFFolder, checkpoint_architecture, load_weights, metadata_of, save_weights
from test_model import hf_greedy, llava_config_from_hf, prompt_and_image


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_llava("wide", seed=5)


def loaded(hf_model, path, **settings):
    model = LlavaVlm(llava_config_from_hf(hf_model.config, **settings))
    load_weights(model, path)
    return model


def weights_of(model):
    return {name: parameter.asnumpy() for name, parameter in model.weights().items()}


@pytest.mark.parametrize("layout, shards", [("hub", 2), ("in_memory", 1), ("v5", 3)])
def test_hf_folder_loads_like_the_converted_checkpoints(hf_model, tmp_path, layout, shards):
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "hf"), layout=layout, shards=shards)
    direct = loaded(hf_model, folder)
    for fmt in ("ckpt", "safetensors"):
        converted = convert_llava(folder, str(tmp_path / f"llava.{fmt}"), progress=False, fmt=fmt).output_path
        reference = weights_of(loaded(hf_model, converted))
        assert all(np.array_equal(value, reference[name]) for name, value in weights_of(direct).items()), fmt
    ids, pixels = prompt_and_image(30, hf_model, direct)
    assert direct.generate([ids], pixel_values=pixels, max_new_tokens=12)[0][len(ids):] == \
        hf_greedy(hf_model, ids, pixels, 12)


def test_the_checkpoint_says_what_it_holds(hf_model, tmp_path):
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "hf"))
    config = llava_config_from_hf(hf_model.config)
    expected = metadata_of(config)["architecture"]
    assert checkpoint_architecture(folder) == expected  # from config.json
    converted = convert_llava(folder, str(tmp_path / "shards"), progress=False, model_parallel=2).output_path
    assert checkpoint_architecture(converted) == expected  # from the metadata, rank_0's
    assert checkpoint_architecture(os.path.join(folder, "model.safetensors")) == expected  # config.json beside it
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(os.path.join(folder, "model.safetensors"), lone)
    assert checkpoint_architecture(str(lone / "model.safetensors")) is None  # a lone HF file says nothing


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_parameters_take_the_files_values_in_their_own_dtype(hf_model, tmp_path, dtype):
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "hf"))  # float32 on disk
    model = loaded(hf_model, folder, param_init_type=dtype)
    weight = model.language_model.layers[0].mlp.up_proj.weight
    assert weight.dtype == getattr(ms, dtype)
    expected = hf_model.model.language_model.layers[0].mlp.up_proj.weight.detach()
    expected = expected.to(getattr(__import__("torch"), dtype)).float().numpy()  # rounded as the loader rounds
    np.testing.assert_array_equal(weight.astype(ms.float32).asnumpy(), expected)
    assert model.language_model.norm.weight.dtype == ms.float32  # vectors stay float32


def test_a_second_load_overwrites_in_place(hf_model, tmp_path):
    """Steps compiled before a load keep their tensors: the second load must write into them."""
    first = save_hf_checkpoint(hf_model, str(tmp_path / "first"))
    other = make_hf_llava("wide", seed=6)
    second = save_hf_checkpoint(other, str(tmp_path / "second"))
    model = loaded(hf_model, first)
    ids, pixels = prompt_and_image(31, hf_model, model)
    assert model.generate([ids], pixel_values=pixels, max_new_tokens=6)[0][len(ids):] == \
        hf_greedy(hf_model, ids, pixels, 6)
    load_weights(model, second)
    assert model.generate([ids], pixel_values=pixels, max_new_tokens=6)[0][len(ids):] == \
        hf_greedy(other, ids, pixels, 6)


def test_saved_weights_round_trip(hf_model, tmp_path):
    model = loaded(hf_model, save_hf_checkpoint(hf_model, str(tmp_path / "hf")))
    save_weights(model, str(tmp_path / "saved.ckpt"), "float16")
    again = loaded(hf_model, str(tmp_path / "saved.ckpt"))
    for name, value in weights_of(model).items():
        np.testing.assert_array_equal(weights_of(again)[name], value.astype(np.float16).astype(np.float32))


# ------------------------------------------------------------------------------------------- bad sources

def test_hf_folder_without_config_json(hf_model, tmp_path):
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "hf"), shards=2)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(CheckpointError, match="has no config.json: an HF checkpoint folder needs one"):
        loaded(hf_model, folder)


def test_hf_config_that_does_not_match_the_tensors(hf_model, tmp_path):
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "hf"))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["num_hidden_layers"] += 1
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    layers = hf_model.config.text_config.num_hidden_layers
    with pytest.raises(CheckpointError, match=f"missing tensor 'language_model.layers.{layers}."):
        HFFolder(folder).plan(HFFolder(folder).config())


def test_index_naming_a_missing_shard(hf_model, tmp_path):
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "hf"), shards=3)
    os.remove(os.path.join(folder, "model-00003-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="lists shard model-00003-of-00003.safetensors, which is missing"):
        loaded(hf_model, folder)


def test_a_checkpoint_without_llava_ms_metadata_is_refused(hf_model, tmp_path):
    """Files of another tool, or of llava-ms before 2026-12 (linear weights stored in another order)."""
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "hf"))
    converted = convert_llava(folder, str(tmp_path / "llava.ckpt"), progress=False).output_path
    with CheckpointWriter(str(tmp_path / "old.ckpt")) as writer:
        for name, array in iter_checkpoint(converted):
            writer.write(name, array)
    with pytest.raises(CheckpointError, match="old.ckpt was not written by this version of llava-ms"):
        loaded(hf_model, str(tmp_path / "old.ckpt"))


def test_non_finite_weights_are_named(hf_model, tmp_path):
    model = loaded(hf_model, save_hf_checkpoint(hf_model, str(tmp_path / "hf")))
    config = llava_config_from_hf(hf_model.config)
    with CheckpointWriter(str(tmp_path / "nan.ckpt"), metadata_of(config)) as writer:
        for name, value in weights_of(model).items():
            if name == "projector.linear_1.bias":
                value = value.copy()
                value[7] = np.inf
            writer.write(name, value)
    with pytest.raises(CheckpointError, match=r"tensor 'projector.linear_1.bias' holds inf at \(7,\)"):
        loaded(hf_model, str(tmp_path / "nan.ckpt"))


def test_folder_with_two_weight_files_is_ambiguous(hf_model, tmp_path):
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "hf"))
    converted = tmp_path / "converted"
    converted.mkdir()
    convert_llava(folder, str(converted / "a.ckpt"), progress=False)
    shutil.copy(converted / "a.ckpt", converted / "b.ckpt")
    with pytest.raises(CheckpointError, match=r"expected one .ckpt or .safetensors file in the folder, found 2"):
        loaded(hf_model, str(converted))
