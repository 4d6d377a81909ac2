"""convert_weight.py: HF LLaVA-1.5 safetensors -> a llava-ms `.ckpt` or safetensors file.

Every converted tensor is compared exactly with the HF tensor transformed by rules written out here
independently of the converter; the three naming layouts, single-file and sharded input, output dtypes,
each kind of bad checkpoint (with the message it must give), and interruptions (nothing left behind).
"""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mindspore as ms
from mindspore.train.checkpoint_pb2 import Checkpoint

import convert_weight
from convert_weight import convert_llava, main
from hf_reference import TINY_CONFIGS, VOCAB_SIZE, make_hf_llava, save_hf_checkpoint
import llava_checkpoint
from llava_checkpoint import (METADATA_NAME, CheckpointError, CheckpointWriter, SafetensorsFile, checkpoint_metadata,
                              iter_checkpoint, read_ahead)
from llava_config import LlavaConfig, architecture, config_from_hf
from llava_layout import LAYOUT_VERSION, checkpoint_layout
from llava_weights import resolve_weights_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = ("hub", "in_memory", "v5")


# ----------------------------------------------------------------------------------------------------------
# The expected result, derived from the HF model's own (transformers 4.5x in-memory) names.
# ----------------------------------------------------------------------------------------------------------

def our_config(name):
    """The LlavaConfig of a tiny reference model, written from its spec (not from the converter)."""
    spec = TINY_CONFIGS[name]
    return LlavaConfig(vision_config=dict(spec["vision"], vision_feature_layer=spec["vision_feature_layer"]),
                       text_config=dict(spec["text"], vocab_size=VOCAB_SIZE))


_ROW_SPLIT = ("out_proj", "o_proj", "fc2", "down_proj")  # row-parallel linears


def expected_tensors(hf_model, num_vision_layers):
    """Our name -> float32 array: HF tensors renamed, unused ones dropped, the patch conv flattened."""
    expected = {}
    for name, tensor in hf_model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name.startswith("model.vision_tower.vision_model."):
            local = name[len("model.vision_tower.vision_model."):]
            layer = re.match(r"encoder\.layers\.(\d+)\.", local)
            if local.startswith("post_layernorm.") or (layer and int(layer.group(1)) >= num_vision_layers):
                continue
            ours = "vision_tower." + local.replace("pre_layrnorm", "pre_layernorm").replace("encoder.", "")
        elif name.startswith("model.multi_modal_projector."):
            ours = "projector." + name[len("model.multi_modal_projector."):]
        elif name.startswith("model.language_model."):
            ours = "language_model." + name[len("model.language_model."):]
        else:
            assert name == "lm_head.weight", name
            ours = name
        if ours.endswith("patch_embedding.weight"):  # conv [Hv, 3, p, p] -> linear [Hv, 3*p*p]
            array = array.reshape(array.shape[0], -1)
        expected[ours] = np.ascontiguousarray(array)
    return expected


def read_back(path):
    return dict(iter_checkpoint(path))


def leftovers(directory):
    """Temporary files a writer might have left in `directory`."""
    return [name for name in os.listdir(directory) if name.startswith(".partial-")]


@pytest.fixture(scope="module")
def hf_models():
    return {name: make_hf_llava(name, seed=3) for name in TINY_CONFIGS}


@pytest.fixture()
def hub_dir(hf_models, tmp_path):
    """The small model in the hub layout, one file."""
    return save_hf_checkpoint(hf_models["small"], str(tmp_path / "hf"))


def edit_safetensors(directory, edit):
    """Rewrite `directory/model.safetensors` with `edit(tensors)` applied (a dict of hub names)."""
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


# ----------------------------------------------------------------------------------------------------------
# Correct conversions.
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_every_tensor_converted_exactly(hf_models, tmp_path, name, layout, shards):
    source = save_hf_checkpoint(hf_models[name], str(tmp_path / "hf"), layout=layout, shards=shards)
    output = str(tmp_path / "out" / "llava.ckpt")
    summary = convert_llava(source, output, progress=False)

    config = our_config(name)
    expected = expected_tensors(hf_models[name], config.vision_config.num_computed_layers)
    converted = read_back(output)
    layout_shapes = checkpoint_layout(config)
    assert {key: value.shape for key, value in converted.items()} == layout_shapes
    assert checkpoint_layout(summary.config) == layout_shapes  # the config read from config.json agrees
    assert converted.keys() == expected.keys()
    for key, value in converted.items():
        assert value.dtype == np.float32, key  # the source dtype is kept
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    assert summary.tensors_written == len(layout_shapes)
    assert checkpoint_metadata(output) == {"layout": LAYOUT_VERSION, "architecture": architecture(config)}
    # Skipped deliberately: post_layernorm and the vision layers after the feature layer.
    vision = config.vision_config
    assert len(summary.skipped) == 2 + 16 * (vision.num_hidden_layers - vision.num_computed_layers)
    assert os.listdir(tmp_path / "out") == ["llava.ckpt"]


def test_output_does_not_depend_on_spelling_or_sharding(hf_models, tmp_path):
    files = []
    for layout, shards in (("hub", 1), ("in_memory", 3), ("v5", 2)):
        source = save_hf_checkpoint(hf_models["wide"], str(tmp_path / f"{layout}-{shards}"), layout, shards)
        files.append(str(tmp_path / f"{layout}-{shards}.ckpt"))
        convert_llava(source, files[-1], progress=False)
    contents = [open(path, "rb").read() for path in files]
    assert contents[0] == contents[1] == contents[2]


def test_mindspore_load_checkpoint_reads_the_output(hf_models, hub_dir, tmp_path):
    output = str(tmp_path / "llava.ckpt")
    convert_llava(hub_dir, output, progress=False)
    expected = expected_tensors(hf_models["small"], our_config("small").vision_config.num_computed_layers)
    loaded = ms.load_checkpoint(output)
    assert loaded.pop(METADATA_NAME).dtype == ms.uint8  # the layout and architecture record
    assert loaded.keys() == expected.keys()
    for key, parameter in loaded.items():
        np.testing.assert_array_equal(parameter.asnumpy(), expected[key], err_msg=key)


def test_float16_output(hf_models, hub_dir, tmp_path):
    output = str(tmp_path / "llava.ckpt")
    convert_llava(hub_dir, output, dtype="float16", progress=False)
    expected = expected_tensors(hf_models["small"], our_config("small").vision_config.num_computed_layers)
    for key, value in iter_checkpoint(output):
        assert value.dtype == np.float16, key
        np.testing.assert_array_equal(value, expected[key].astype(np.float16), err_msg=key)
        # Half a unit in the last place: relative for normal float16, 2**-25 absolute among the subnormals.
        np.testing.assert_allclose(value.astype(np.float32), expected[key], rtol=2 ** -11, atol=2 ** -25,
                                   err_msg=key)


def bfloat16_rounded(array):
    return torch.from_numpy(array).to(torch.bfloat16).float().numpy()


def test_bfloat16_output(hf_models, hub_dir, tmp_path):
    output = str(tmp_path / "llava.ckpt")
    convert_llava(hub_dir, output, dtype="bfloat16", progress=False)
    expected = expected_tensors(hf_models["small"], our_config("small").vision_config.num_computed_layers)
    for key, value in iter_checkpoint(output):  # bfloat16 reads back as float32
        np.testing.assert_array_equal(value, bfloat16_rounded(expected[key]), err_msg=key)  # round to nearest even
        np.testing.assert_allclose(value, expected[key], rtol=2 ** -8, atol=0, err_msg=key)
    assert ms.load_checkpoint(output)["lm_head.weight"].dtype == ms.bfloat16


@pytest.mark.parametrize("dtype", [None, "float32", "float16"])
def test_bfloat16_source_is_read_without_torch(hf_models, tmp_path, dtype):
    """bf16 safetensors (which numpy cannot load) are read by the converter's own reader."""
    model = make_hf_llava("small", seed=3).to(torch.bfloat16)
    source = save_hf_checkpoint(model, str(tmp_path / "hf"), shards=2)
    output = str(tmp_path / "llava.ckpt")
    convert_llava(source, output, dtype=dtype, progress=False)
    expected = expected_tensors(model, our_config("small").vision_config.num_computed_layers)  # exact in f32
    for key, value in iter_checkpoint(output):
        want = expected[key].astype(np.float16) if dtype == "float16" else expected[key]
        np.testing.assert_array_equal(value, want, err_msg=key)
    if dtype is None:  # kept as bfloat16
        assert ms.load_checkpoint(output)["language_model.embed_tokens.weight"].dtype == ms.bfloat16


def test_float16_source_stays_float16(tmp_path):
    model = make_hf_llava("wide", seed=4).half()
    output = str(tmp_path / "llava.ckpt")
    convert_llava(save_hf_checkpoint(model, str(tmp_path / "hf")), output, progress=False)
    expected = expected_tensors(model, our_config("wide").vision_config.num_computed_layers)
    for key, value in iter_checkpoint(output):
        assert value.dtype == np.float16, key
        np.testing.assert_array_equal(value, expected[key].astype(np.float16), err_msg=key)


def test_without_config_json_sizes_are_inferred(hf_models, tmp_path):
    source = save_hf_checkpoint(hf_models["small"], str(tmp_path / "hf"), write_config=False)
    output = str(tmp_path / "llava.ckpt")
    summary = convert_llava(source, output, progress=False)
    assert "inferred" in summary.config_source
    assert {key: value.shape for key, value in iter_checkpoint(output)} == checkpoint_layout(our_config("small"))
    vision, text = summary.config.vision_config, summary.config.text_config
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers) == (28, 14, 3)
    assert vision.vision_feature_layer == -2  # the 7B default: shapes cannot tell
    assert (text.hidden_size, text.num_layers, text.vocab_size, text.intermediate_size) == (64, 2, VOCAB_SIZE, 128)


def test_single_safetensors_file_and_shards_without_index(hf_models, tmp_path):
    single = save_hf_checkpoint(hf_models["small"], str(tmp_path / "single"))
    convert_llava(os.path.join(single, "model.safetensors"), str(tmp_path / "a.ckpt"), progress=False)
    sharded = save_hf_checkpoint(hf_models["small"], str(tmp_path / "sharded"), shards=3)
    os.remove(os.path.join(sharded, "model.safetensors.index.json"))
    convert_llava(sharded, str(tmp_path / "b.ckpt"), progress=False)
    assert open(tmp_path / "a.ckpt", "rb").read() == open(tmp_path / "b.ckpt", "rb").read()


def test_hub_config_json_gives_the_7b_config():
    """The hub's config.json leaves text_config sparse: the 7B LLaMA-2 defaults fill it."""
    hub = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
           "vision_feature_select_strategy": "default", "vocab_size": 32064,
           "text_config": {"model_type": "llama", "rms_norm_eps": 1e-05, "vocab_size": 32064,
                           "max_position_embeddings": 4096, "architectures": ["LlamaForCausalLM"]},
           "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                             "model_type": "clip_vision_model", "num_attention_heads": 16,
                             "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000}}
    config = config_from_hf(hub)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_layers, text.num_heads, text.intermediate_size, text.vocab_size) == (
        4096, 32, 32, 11008, 32064)
    assert (vision.hidden_size, vision.num_computed_layers, vision.num_patches, config.image_token_id) == (
        1024, 23, 576, 32000)
    assert checkpoint_layout(config)["lm_head.weight"] == (32064, 4096)
    with pytest.raises(ValueError, match="several layers"):
        config_from_hf(dict(hub, vision_feature_layer=[-2, -5]))


def test_progress_bar_on_request(hub_dir, tmp_path, capsys):
    convert_llava(hub_dir, str(tmp_path / "llava.ckpt"), progress=True)
    assert "tensors" in capsys.readouterr().err
    convert_llava(hub_dir, str(tmp_path / "llava.ckpt"), progress=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------------
# Bad checkpoints: one clear error naming the culprit, nothing written.
# ----------------------------------------------------------------------------------------------------------

def convert_fails(source, tmp_path, match):
    """Run a conversion expected to fail; check the message and that the output directory stays empty."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(CheckpointError, match=match) as error:
        convert_llava(str(source), str(out_dir / "llava.ckpt"), progress=False)
    assert os.listdir(out_dir) == []
    return str(error.value)


def test_missing_tensor(hub_dir, tmp_path):
    edit_safetensors(hub_dir, lambda tensors: tensors.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    convert_fails(hub_dir, tmp_path, r"missing tensor 'language_model\.layers\.1\.mlp\.up_proj\.weight'")


def test_unexpected_tensor(hub_dir, tmp_path):
    name = "language_model.model.layers.0.self_attn.foo.weight"
    edit_safetensors(hub_dir, lambda tensors: tensors.update({name: torch.zeros(64, 64)}))
    convert_fails(hub_dir, tmp_path, f"{re.escape(repr(name))}.*unexpected tensor")


def test_tensor_outside_llava(hub_dir, tmp_path):
    edit_safetensors(hub_dir, lambda tensors: tensors.update({"text_encoder.weight": torch.zeros(2)}))
    convert_fails(hub_dir, tmp_path, "unexpected tensor 'text_encoder.weight'")


def test_misshaped_tensor(hub_dir, tmp_path):
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    edit_safetensors(hub_dir, lambda tensors: tensors.update({name: torch.zeros(64, 32)}))
    message = convert_fails(hub_dir, tmp_path, re.escape(repr(name)))
    # Names our parameter and gives both shapes.
    assert "'language_model.layers.0.self_attn.q_proj.weight' has shape (64, 32)" in message
    assert "expects (64, 64)" in message and "[64, 32]" in message


def test_duplicate_tensor_in_two_spellings(hub_dir, tmp_path):
    edit_safetensors(hub_dir, lambda tensors: tensors.update(
        {"lm_head.weight": tensors["language_model.lm_head.weight"].clone()}))
    convert_fails(hub_dir, tmp_path, "duplicate tensor")


def test_directory_without_safetensors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    convert_fails(empty, tmp_path, f"no .safetensors files in {re.escape(str(empty))}")


def test_missing_input_path(tmp_path):
    convert_fails(tmp_path / "nowhere", tmp_path, "input path not found")


def test_index_lists_a_missing_shard(hf_models, tmp_path):
    source = save_hf_checkpoint(hf_models["small"], str(tmp_path / "hf"), shards=3)
    os.remove(os.path.join(source, "model-00002-of-00003.safetensors"))
    convert_fails(source, tmp_path, "shard model-00002-of-00003.safetensors, which is missing")


def test_truncated_safetensors(hub_dir, tmp_path):
    path = os.path.join(hub_dir, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    convert_fails(hub_dir, tmp_path, "model.safetensors is not a readable safetensors file")


def test_read_ahead_gives_each_tensor_and_asks_the_disk_for_the_next_first(tmp_path, monkeypatch):
    from safetensors.numpy import save_file
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones((2, 5), np.float16)}
    for name, array in arrays.items():
        save_file({name: array}, str(tmp_path / f"{name}.safetensors"))
    files = {name: SafetensorsFile(str(tmp_path / f"{name}.safetensors")) for name in arrays}
    events, original = [], SafetensorsFile.prefetch

    def prefetch(file, name, rows=None):
        events.append(("prefetch", name, rows))
        original(file, name, rows)
    monkeypatch.setattr(SafetensorsFile, "prefetch", prefetch)
    requests = [(files["a"], "a", slice(1, 3)), (files["b"], "b", None), (files["a"], "a", None)]
    for (_, name, rows), array in zip(requests, read_ahead(requests)):
        events.append(("got", name, rows))
        expected = arrays[name] if rows is None else arrays[name][rows]
        assert array.dtype == expected.dtype and np.array_equal(array, expected)
    assert events == [("prefetch", "b", None), ("got", "a", slice(1, 3)), ("prefetch", "a", None), ("got", "b", None),
                      ("got", "a", None)]


def test_non_finite_weights_are_named(hub_dir, tmp_path):
    name = "language_model.model.layers.1.self_attn.v_proj.weight"

    def poison(tensors):
        tensors[name][3, 5] = float("nan")
    edit_safetensors(hub_dir, poison)
    convert_fails(hub_dir, tmp_path, r"'language_model\.layers\.1\.self_attn\.v_proj\.weight' holds nan at \(3, 5\)")


def test_unsupported_dtype_argument(hub_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        convert_llava(hub_dir, str(tmp_path / "x.ckpt"), dtype="int8", progress=False)


# ----------------------------------------------------------------------------------------------------------
# Interruptions: the output appears whole or not at all.
# ----------------------------------------------------------------------------------------------------------

def fail_on_call(monkeypatch, call):
    """Make the safetensors reader raise on its `call`-th tensor (a failure late in the conversion)."""
    original, calls = SafetensorsFile.read, []

    def read(*args):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("disk gone")
        return original(*args)

    monkeypatch.setattr(SafetensorsFile, "read", read)


def test_error_on_a_late_tensor_leaves_nothing(hub_dir, tmp_path, monkeypatch):
    fail_on_call(monkeypatch, 60)  # of 62
    out_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk gone"):
        convert_llava(hub_dir, str(out_dir / "llava.ckpt"), progress=False)
    assert not os.path.exists(out_dir)  # nor the directory made for the output


def test_failed_conversion_keeps_the_previous_output(hub_dir, tmp_path, monkeypatch):
    output = tmp_path / "llava.ckpt"
    output.write_bytes(b"previous")
    fail_on_call(monkeypatch, 30)
    with pytest.raises(RuntimeError):
        convert_llava(hub_dir, str(output), progress=False)
    assert output.read_bytes() == b"previous" and leftovers(tmp_path) == []


# Runs the CLI with every tensor read slowed down, so a signal reliably arrives mid-conversion.
SLOW_CLI = """
import sys, time
sys.path.insert(0, {repo!r})
sys.path.insert(0, {plugin!r})
import convert_weight
from llava_checkpoint import SafetensorsFile
original = SafetensorsFile.read
def slow_read(*args):
    time.sleep(0.2)
    return original(*args)
SafetensorsFile.read = slow_read
sys.exit(convert_weight.main(sys.argv[1:]))
"""


def start_slow_conversion(source, output, cwd, *extra, writers=1):
    """The converter's command line, each tensor read slowed down; returns once all `writers` partial files of
    `output` exist (`output` a .ckpt, or with --model_parallel a directory of rank_K/, one writer a rank)."""
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI.format(repo=REPO, plugin=os.path.join(REPO, "research", "llava")),
         "--model", "llava", "--input_path", source,
         "--output_path", str(output), *extra], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partials = os.path.join(glob.escape(str(output)), "*", ".partial-*") if extra else \
        os.path.join(glob.escape(os.path.dirname(str(output))), ".partial-*")
    deadline = time.monotonic() + 120
    while len(glob.glob(partials)) < writers:  # every temporary file exists: writing has begun (ranks open in turn)
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_conversion_leaves_nothing(hub_dir, tmp_path, signum):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = start_slow_conversion(hub_dir, out_dir / "new" / "llava.ckpt", tmp_path)
    try:
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == convert_weight.INTERRUPTED
    assert os.listdir(out_dir) == []  # neither a partial file nor the folder made for the output


@pytest.mark.parametrize("signum,delay", [(signal.SIGINT, 0.3), (signal.SIGTERM, 0.8), (signal.SIGINT, 1.4),
                                          (signal.SIGTERM, 2.0)])
def test_signal_while_the_converter_starts_is_one_line(hub_dir, tmp_path, signum, delay):
    """While MindSpore and MindFormers are imported (the first seconds), a KeyboardInterrupt raised inside their
    C++ modules' initialization aborted the process or printed a traceback."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "convert_weight.py"), "--model", "llava",
                                "--input_path", hub_dir, "--output_path", str(tmp_path / "out" / "llava.ckpt")],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [convert_weight.INTERRUPTED]
    assert not os.path.exists(tmp_path / "out")


def test_partial_files_left_by_kill_9_are_ignored_then_removed(hub_dir, tmp_path):
    """kill -9 leaves each rank's partial file; loading the directory ignores them (it used to find 2 .ckpt), and
    the next conversion there removes them."""
    shards = tmp_path / "shards"
    process = start_slow_conversion(hub_dir, shards, tmp_path, "--model_parallel", "2", writers=2)
    process.kill()
    process.communicate(timeout=60)
    assert [len(leftovers(shards / f"rank_{rank}")) for rank in range(2)] == [1, 1]
    convert_llava(hub_dir, str(shards), progress=False, model_parallel=2)
    for rank in range(2):
        assert os.listdir(shards / f"rank_{rank}") == ["llava.ckpt"]
    stale = shards / "rank_0" / ".partial-left-by-a-crash.ckpt"
    stale.write_bytes(b"half a tensor")
    assert resolve_weights_file(str(shards / "rank_0")) == str(shards / "rank_0" / "llava.ckpt")


def test_a_live_writers_partial_file_is_left_alone(tmp_path):
    with CheckpointWriter(str(tmp_path / "first.ckpt")) as first:
        first.write("a", np.zeros(3, np.float32))
        with CheckpointWriter(str(tmp_path / "second.ckpt")) as second:
            second.write("b", np.ones(2, np.float32))
            assert len(leftovers(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["first.ckpt", "second.ckpt"]


def test_output_that_is_an_input_is_refused(hub_dir, tmp_path):
    """`--output_path` equal to the input's model.safetensors (or its config.json, or a link to either) used to
    replace the weights and exit 0."""
    weights = os.path.join(hub_dir, "model.safetensors")
    original = open(weights, "rb").read()
    os.link(weights, tmp_path / "hard_link.ckpt")
    os.symlink(os.path.join(hub_dir, "config.json"), tmp_path / "link.ckpt")
    for output in (weights, os.path.join(hub_dir, "config.json"), str(tmp_path / "hard_link.ckpt"),
                   str(tmp_path / "link.ckpt")):
        with pytest.raises(CheckpointError, match="writing it would destroy the weights being converted"):
            convert_llava(hub_dir, output, progress=False)
    with pytest.raises(CheckpointError, match=f"output {re.escape(weights)} is the input file"):
        convert_llava(weights, weights, progress=False)
    assert open(weights, "rb").read() == original and leftovers(hub_dir) == []


def test_output_under_a_file_is_named(hub_dir, tmp_path):
    (tmp_path / "notes").write_text("")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'notes'))} is a file, not a directory"):
        convert_llava(hub_dir, str(tmp_path / "notes" / "llava.ckpt"), progress=False)


# ----------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------

def run_cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "convert_weight.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_bad_input_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--model", "llava", "--input_path", str(empty), "--output_path", str(tmp_path / "x.ckpt"),
                     cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""  # mindformers' import-time warnings are silenced too
    assert result.stderr.strip().splitlines() == [f"convert_weight: error: no .safetensors files in {empty}"]
    assert not os.path.exists(tmp_path / "x.ckpt")


def test_cli_converts_quietly(hf_models, tmp_path):
    source = save_hf_checkpoint(hf_models["wide"], str(tmp_path / "hf"), layout="v5", shards=3)
    output = tmp_path / "llava.ckpt"
    result = run_cli("--model", "llava", "--input_path", source, "--output_path", str(output), "--dtype", "float16",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()  # no progress bar: stderr is not a terminal
    assert len(lines) == 1 and lines[0].startswith(f"wrote {output}:"), lines
    expected = expected_tensors(hf_models["wide"], our_config("wide").vision_config.num_computed_layers)
    for key, value in iter_checkpoint(str(output)):
        np.testing.assert_array_equal(value, expected[key].astype(np.float16), err_msg=key)


def test_wrong_model_is_refused(tmp_path, capsys):
    code = main(["--model", "llama", "--input_path", str(tmp_path), "--output_path", str(tmp_path / "x.ckpt")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "convert_weight: error: --model 'llama' is not supported; choose from llava"]


# ----------------------------------------------------------------------------------------------------------
# Per-rank shards (--model_parallel N): rank_K/llava.ckpt, checked against the full conversion.
# ----------------------------------------------------------------------------------------------------------

# Written out here, not taken from llava_layout: weights are [out, in]; column-parallel linears split their
# outputs (axis 0 of weight and bias), row-parallel ones their inputs (axis 1 of the weight; bias kept whole).
_COLUMN_SPLIT = ("q_proj", "k_proj", "v_proj", "fc1", "gate_proj", "up_proj")


def expected_split_axis(name):
    module, kind = name.split(".")[-2:]
    if module in _COLUMN_SPLIT:
        return 0
    if module in _ROW_SPLIT and kind == "weight":
        return 1
    return None


@pytest.mark.parametrize("name,dtype", [("small", None), ("wide", "float16")])
def test_model_parallel_shards_make_up_the_full_conversion(hf_models, tmp_path, name, dtype):
    source = save_hf_checkpoint(hf_models[name], str(tmp_path / "hf"), shards=2)
    full = read_back(convert_llava(source, str(tmp_path / "full.ckpt"), dtype=dtype, progress=False).output_path)
    summary = convert_llava(source, str(tmp_path / "shards"), dtype=dtype, progress=False, model_parallel=2)

    assert sorted(os.listdir(tmp_path / "shards")) == ["rank_0", "rank_1"]
    assert summary.output_files == [str(tmp_path / "shards" / f"rank_{k}" / "llava.ckpt") for k in range(2)]
    for rank in range(2):
        assert os.listdir(tmp_path / "shards" / f"rank_{rank}") == ["llava.ckpt"]
    ranks = [read_back(path) for path in summary.output_files]
    assert list(ranks[0]) == list(ranks[1]) == list(full)  # same names, same order
    split = 0
    for key, value in full.items():
        axis = expected_split_axis(key)
        for rank in ranks:
            assert rank[key].dtype == value.dtype, key
        if axis is None:  # replicated: whole on every rank
            for rank in ranks:
                np.testing.assert_array_equal(rank[key], value, err_msg=key)
        else:
            split += 1
            assert ranks[0][key].shape[axis] * 2 == value.shape[axis], key
            np.testing.assert_array_equal(np.concatenate([rank[key] for rank in ranks], axis=axis), value,
                                          err_msg=key)
    # Per vision layer q/k/v weights and biases, fc1 weight and bias, out_proj and fc2 weights; per text
    # layer q/k/v/o and gate/up/down.
    config = our_config(name)
    assert split == 10 * config.vision_config.num_computed_layers + 7 * config.text_config.num_layers
    assert summary.tensors_written == len(full)


def test_model_parallel_not_dividing_the_heads_writes_nothing(hub_dir, tmp_path):
    # small: 4 heads in both towers; 8 divides every split dimension (32, 64, 128) but not the heads.
    for size in (3, 8):
        with pytest.raises(CheckpointError, match=f"model_parallel={size} does not divide the 4 vision attention "
                                                  "heads"):
            convert_llava(hub_dir, str(tmp_path / "shards"), progress=False, model_parallel=size)
        assert not os.path.exists(tmp_path / "shards")


def test_model_parallel_not_dividing_a_dimension_names_the_tensor(hf_models, tmp_path):
    # wide: 6 heads divide by 3, the text MLP's 160 channels do not.
    source = save_hf_checkpoint(hf_models["wide"], str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"does not divide dimension 0 \(160\) of "
                                              r"'language_model\.layers\.0\.mlp\.gate_proj\.weight'"):
        convert_llava(source, str(tmp_path / "shards"), progress=False, model_parallel=3)
    assert not os.path.exists(tmp_path / "shards")


def test_model_parallel_error_mid_way_leaves_nothing(hub_dir, tmp_path, monkeypatch):
    fail_on_call(monkeypatch, 40)
    with pytest.raises(RuntimeError, match="disk gone"):
        convert_llava(hub_dir, str(tmp_path / "new" / "shards"), progress=False, model_parallel=2)
    assert os.listdir(tmp_path) == ["hf"]  # neither rank_K, nor the directories made for them
    existing = tmp_path / "kept"
    existing.mkdir()
    fail_on_call(monkeypatch, 20)
    with pytest.raises(RuntimeError):
        convert_llava(hub_dir, str(existing), progress=False, model_parallel=2)
    assert os.listdir(existing) == []


def test_model_parallel_output_must_be_a_directory(hub_dir, tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"previous")
    with pytest.raises(CheckpointError, match="is a file; with model_parallel=2 give a directory"):
        convert_llava(hub_dir, str(tmp_path / "x.ckpt"), progress=False, model_parallel=2)
    assert (tmp_path / "x.ckpt").read_bytes() == b"previous"


def test_cli_model_parallel(hf_models, tmp_path):
    source = save_hf_checkpoint(hf_models["small"], str(tmp_path / "hf"))
    result = run_cli("--model", "llava", "--input_path", source, "--output_path", str(tmp_path / "shards"),
                     "--model_parallel", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {tmp_path / 'shards'} (rank_0 .. rank_1/llava.ckpt):")
    expected = expected_tensors(hf_models["small"], our_config("small").vision_config.num_computed_layers)
    shards = [read_back(str(tmp_path / "shards" / f"rank_{k}" / "llava.ckpt")) for k in range(2)]
    name = "language_model.layers.1.mlp.down_proj.weight"  # row-parallel: [out, in], split on axis 1
    np.testing.assert_array_equal(np.concatenate([shards[0][name], shards[1][name]], axis=1), expected[name])


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_cli_model_parallel_must_be_positive(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "llava", "--input_path", str(tmp_path), "--output_path", str(tmp_path / "x"),
              "--model_parallel", value])
    assert exit_info.value.code == 2
    assert "--model_parallel: expected a positive integer" in capsys.readouterr().err


def test_writer_records_are_protobufs_own_serialization(tmp_path, monkeypatch):
    """The writer frames each record by hand and writes the tensor bytes straight from the array; the file
    must be byte for byte what protobuf serializes, slices of an over-sized tensor included."""
    monkeypatch.setattr(llava_checkpoint, "_SLICE_BYTES", 64)  # 16 float32 per record: forces several slices
    tensors = [("vision_tower.embeddings.class_embedding", np.arange(40, dtype=np.float32)),
               ("empty", np.zeros((0, 3), np.float16)), ("scalar", np.array(2.5, np.float32)),
               ("matrix", np.random.default_rng(0).standard_normal((5, 7)).astype(np.float16))]
    path = tmp_path / "x.ckpt"
    with CheckpointWriter(str(path)) as writer:
        for name, array in tensors:
            writer.write(name, array)
    expected = b""
    for name, array in tensors:
        flat = array.reshape(-1)
        step = 64 // array.itemsize
        for start in range(0, max(flat.size, 1), step):
            record = Checkpoint()
            value = record.value.add()
            value.tag = name
            value.tensor.dims.extend(array.shape)
            value.tensor.tensor_type = {np.float32: "Float32", np.float16: "Float16"}[array.dtype.type]
            value.tensor.tensor_content = flat[start:start + step].tobytes()
            expected += record.SerializeToString()
    assert path.read_bytes() == expected
    for (name, array), (read_name, read) in zip(tensors, iter_checkpoint(str(path))):
        assert name == read_name and np.array_equal(array, read)


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_safetensors_output_loads_with_mindspore_and_matches_the_ckpt(hf_models, hub_dir, tmp_path, dtype):
    """--format safetensors: MindSpore-loadable safetensors with the same tensors as the .ckpt, and the metadata."""
    ckpt = read_back(convert_llava(hub_dir, str(tmp_path / "llava.ckpt"), dtype=dtype, progress=False).output_path)
    output = str(tmp_path / "llava.safetensors")
    convert_llava(hub_dir, output, dtype=dtype, progress=False, fmt="safetensors")
    file = SafetensorsFile(output)
    assert list(file.tensors) == list(ckpt)  # the model's order
    assert file.llava_metadata() == {"layout": LAYOUT_VERSION, "architecture": architecture(our_config("small"))}
    for name, value in ckpt.items():
        read = file.read(name)
        read = (read.astype(np.uint32) << 16).view(np.float32) if read.dtype == np.uint16 else read
        np.testing.assert_array_equal(read, value, err_msg=name)
    if dtype != "bfloat16":  # MindSpore's reader needs numpy bfloat16 for those
        loaded = ms.load_checkpoint(output, format="safetensors")
        assert loaded.keys() == ckpt.keys()
        np.testing.assert_array_equal(loaded["lm_head.weight"].asnumpy(), ckpt["lm_head.weight"])


def test_safetensors_shards_per_rank(hf_models, hub_dir, tmp_path):
    summary = convert_llava(hub_dir, str(tmp_path / "shards"), progress=False, model_parallel=2, fmt="safetensors")
    assert summary.output_files == [str(tmp_path / "shards" / f"rank_{k}" / "llava.safetensors") for k in range(2)]
    full = read_back(convert_llava(hub_dir, str(tmp_path / "full.ckpt"), progress=False).output_path)
    ranks = [SafetensorsFile(path) for path in summary.output_files]
    name = "language_model.layers.0.mlp.gate_proj.weight"  # column-parallel: split on axis 0
    np.testing.assert_array_equal(np.concatenate([rank.read(name) for rank in ranks], axis=0), full[name])
