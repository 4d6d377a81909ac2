"""llava_run_config: what a run YAML may hold. Bad shapes, unknown keys (the closest known one named), values out of
range and a processor that does not fit the model are one-line ValueErrors before anything is built."""
import os

import pytest
import yaml

from conftest import PLUGIN, TINY
from llava_run_config import IGNORED_KEYS, load_run_config, parse_option

YAML_7B = os.path.join(PLUGIN, "llava1_5_7B", "predict_llava1_5_7b.yaml")
YAML_TINY = os.path.join(TINY, "predict_llava_tiny.yaml")
YAML_FINETUNE = os.path.join(TINY, "finetune_llava_tiny.yaml")


def refused(path, options=(), flags=None, error=ValueError):
    with pytest.raises(error) as info:
        load_run_config(str(path), options, flags)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


def write_yaml(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_without(tmp_path, *dotted_keys):
    """The tiny predict YAML with `dotted_keys` removed."""
    with open(YAML_TINY) as f:
        values = yaml.safe_load(f)
    for key in dotted_keys:
        *parents, last = key.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        del node[last]
    return write_yaml(tmp_path, yaml.safe_dump(values))


@pytest.mark.parametrize("path", [YAML_7B, YAML_TINY, YAML_FINETUNE], ids=["7b", "tiny", "finetune"])
def test_bundled_yamls_load(path):
    config = load_run_config(path)
    assert config.model.model_config.type == "LlavaConfig"
    assert config.model.model_config.seq_length == (2048 if path == YAML_7B else 128)


# ----------------------------------------------------------------------------------------------- file and shape

@pytest.mark.parametrize("text,expected", [
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("- model\n- processor\n", "must be a mapping of sections (model:, processor:, ...), not a list"),
    ("just a string\n", "not a str"),
    ("model: [\n", "is not valid YAML"),
    ("seed: 0\n", "has no model.model_config"),
    ("model:\nprocessor: {}\n", "has no model.model_config"),
    ("model: {model_config: {}}\n", "has no model.model_config"),
    ("model: 5\n", "model must be a section"),
])
def test_bad_yaml_shapes(tmp_path, text, expected):
    assert expected in refused(write_yaml(tmp_path, text))


def test_missing_sections_are_named(tmp_path):
    assert "has no processor (the tokenizer" in refused(tiny_without(tmp_path, "processor"))
    assert "has no model.arch.type" in refused(tiny_without(tmp_path, "model.arch"))


def test_missing_directory_and_binary_files(tmp_path):
    assert "config file not found" in refused(tmp_path / "nope.yaml", error=FileNotFoundError)
    assert "is a directory" in refused(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "is not UTF-8 text" in refused(binary)


# ----------------------------------------------------------------------------------------------- keys

@pytest.mark.parametrize("option,closest", [
    ("model.model_config.max_new_token=5", "model.model_config.max_new_tokens"),
    ("model.model_config.repetition_penality=1.2", "model.model_config.repetition_penalty"),
    ("procesor.tokenizer.vocab_file=x", "processor.tokenizer.vocab_file"),
    ("model.model_config.vision_config.model_config.image_szie=32",
     "model.model_config.vision_config.model_config.image_size"),
    ("context.device_targt=CPU", "context.device_target"),
])
def test_misspelt_option_names_the_closest_key(option, closest):
    message = refused(YAML_TINY, [option])
    assert message.startswith("--options: unknown key") and f"did you mean {closest!r}?" in message


def test_unknown_key_in_the_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, open(YAML_TINY).read().replace("  max_new_tokens: 32", "  max_new_tokns: 32"))
    message = refused(path)
    assert str(path) in message and "'model.model_config.max_new_tokns'" in message
    assert "did you mean 'model.model_config.max_new_tokens'?" in message


def test_ignored_upstream_keys_are_accepted():
    load_run_config(YAML_TINY, [f"{key}=1" for key in IGNORED_KEYS])
    assert "unknown key 'trainer.save_checkpoint'" in refused(YAML_TINY, ["trainer.save_checkpoint=x"])


def test_finetune_sections_belong_to_the_trainer():
    config = load_run_config(YAML_FINETUNE, ["optimizer.any_key=1", "train_dataset.stages=[]"])
    assert config.optimizer.any_key == 1
    assert "unknown key 'processor.image_size'" in refused(YAML_FINETUNE, ["processor.image_size=48"])


@pytest.mark.parametrize("option,expected", [
    ("seed", "--options takes KEY=VALUE"),
    ("=3", "--options takes KEY=VALUE"),
    ("model..seq_length=3", "--options takes KEY=VALUE"),
    ("seed.x=1", "cannot set seed.x: seed is 0, not a section"),
    ("seed=[1,", "the value is not valid YAML"),
])
def test_malformed_options(option, expected):
    assert expected in refused(YAML_TINY, [option])


def test_option_values_are_typed_as_yaml_types_them():
    assert parse_option("a.b=3") == ("a.b", 3)
    assert parse_option("a=true") == ("a", True)
    assert parse_option("a=null") == ("a", None)
    assert parse_option("a=x=y") == ("a", "x=y")
    config = load_run_config(YAML_TINY, ["model.model_config.max_new_tokens=7", "model.model_config.top_p=0.5"])
    assert (config.model.model_config.max_new_tokens, config.model.model_config.top_p) == (7, 0.5)


# ----------------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("option,expected", [
    ("model.model_config.max_new_tokens=-1", "max_new_tokens must be an integer >= 0"),
    ("model.model_config.max_new_tokens=abc", "max_new_tokens must be an integer >= 0 (or null: up to max_length), "
                                              "got 'abc'"),
    ("model.model_config.repetition_penalty=0", "repetition_penalty must be a number > 0"),
    ("model.model_config.top_p=1.5", "top_p must be a number in (0, 1]"),
    ("model.model_config.seq_length=abc", "seq_length must be an integer >= 2, got 'abc'"),
    ("model.model_config.compute_dtype=float64", "compute_dtype must be one of float32, float16, bfloat16"),
    ("model.model_config.compile_prefill=yes please", "compile_prefill must be true or false"),
    ("model.model_config.vision_config.model_config.patch_size=0", "vision patch_size must be an integer >= 1"),
    ("model.model_config.text_config.model_config.rms_norm_eps=-1", "text rms_norm_eps must be a number > 0"),
    ("context.mode=2", "context.mode must be 0 (graph) or 1 (PyNative), got 2"),
    ("parallel_config.model_parallel=0", "parallel_config.model_parallel must be an integer >= 1"),
    ("seed=-1", "seed must be an integer >= 0"),
    ("run_mode=train", "run_mode must be predict, finetune or chat"),
])
def test_values_out_of_range(option, expected):
    assert expected in refused(YAML_TINY, [option])


def test_flags_are_checked_like_the_yaml():
    assert "batch_size must be an integer >= 1, got -1" in refused(YAML_TINY, flags={
        "model.model_config.batch_size": -1})
    assert "use_parallel must be true or false" in refused(YAML_TINY, flags={"use_parallel": "maybe"})
    config = load_run_config(YAML_TINY, flags={"model.model_config.batch_size": 3, "seed": None})
    assert config.model.model_config.batch_size == 3 and config.seed == 0  # None: not set


# ----------------------------------------------------------------------------------------------- processor vs model

def test_processor_must_match_the_model():
    """The 7B YAML ties the processor's sizes to the model's with YAML aliases; an --options override of the model's
    unties them, and the mismatch is named (before, MindSpore failed in Reshape and left rank_0/om behind)."""
    message = refused(YAML_7B, ["model.model_config.vision_config.model_config.image_size=224"])
    assert message.startswith("processor.image_size is 336 but") and "image_size is 224" in message
    message = refused(YAML_7B, ["model.model_config.seq_length=1024"])
    assert message.startswith("processor.max_length is 2048 but model.model_config.seq_length is 1024")
    assert "num_image_features is 5" in refused(YAML_TINY, ["processor.num_image_features=5"])
    assert "processor.image_processor.image_size is 32" in refused(
        YAML_TINY, ["processor.image_processor.type=LlavaImageProcessor", "processor.image_processor.image_size=32"])


def test_processor_follows_the_model_when_the_yaml_leaves_its_sizes_out(tmp_path, monkeypatch):
    from llava_run_config import model_config_of
    from llava_runtime import build_processor

    monkeypatch.setenv("REGISTER_PATH", PLUGIN)  # what run_mindformer.py --register_path sets
    path = tiny_without(tmp_path, "processor.image_size", "processor.max_length")
    config = load_run_config(str(path), ["processor.tokenizer.vocab_file=" + os.path.join(TINY, "tokenizer.model")])
    _, processor = build_processor(config.processor, model_config_of(config))
    assert type(processor).__name__ == "LlavaProcessor"  # auto_register builds from MindFormers' copy of the module
    assert (processor.image_processor.image_size, processor.max_length, processor.num_image_features) == (48, 128, 9)
