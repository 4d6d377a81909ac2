"""run_mindformer.py end to end: the 7B YAML's key paths shrunk to a tiny model, a converted checkpoint and
the LLaMA-2 tokenizer; the generated ids equal HuggingFace greedy on the same prompt. Bad inputs exit 2 with
one clear line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REFERENCE_DIR, REPO
from convert_weight import convert_llava
from hf_reference import make_hf_llava, save_hf_checkpoint
from llava_processor import LlavaProcessor
from llava_tokenizer import LlavaTokenizer

TOKENIZER = os.path.join(REFERENCE_DIR, "llama2_tokenizer.model")
YAML_7B = os.path.join(REPO, "research", "llava", "llava1_5_7B", "predict_llava1_5_7b.yaml")
QUESTION = "What is shown in this image?"
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny HF model, its converted checkpoint, a tiny YAML written from the 7B one, and an image."""
    root = tmp_path_factory.mktemp("run")
    hf_model = make_hf_llava("small", seed=11)
    save_hf_checkpoint(hf_model, str(root / "hf"))
    convert_llava(str(root / "hf"), str(root / "tiny.ckpt"), progress=False)
    with open(YAML_7B) as f:
        config = yaml.safe_load(f)
    model_config = config["model"]["model_config"]
    vision = hf_model.config.vision_config
    text = hf_model.config.text_config
    model_config["vision_config"]["model_config"].update(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size, patch_size=vision.patch_size)
    model_config["text_config"]["model_config"].update(
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads)
    model_config.update(seq_length=128, max_new_tokens=NEW_TOKENS)
    config["processor"].update(image_size=vision.image_size, max_length=128)
    config["processor"]["tokenizer"]["vocab_file"] = TOKENIZER
    with open(root / "tiny.yaml", "w") as f:
        yaml.safe_dump(config, f)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((45, 60, 3)) * 255).astype(np.uint8)).save(root / "photo.png")
    return {"root": root, "hf": hf_model, "yaml": str(root / "tiny.yaml"), "ckpt": str(root / "tiny.ckpt"),
            "image": str(root / "photo.png")}


def command(setup, image=None, question=QUESTION, checkpoint=None, options=()):
    # The CPU/float32 settings go through --device_target and --options, as a user would override the 7B YAML.
    return ["--config", setup["yaml"], "--register_path", os.path.join(REPO, "research", "llava"),
            "--run_mode", "predict", "--predict_data", image or setup["image"], question,
            "--modal_type", "image", "text", "--load_checkpoint", checkpoint or setup["ckpt"],
            "--use_parallel", "False", "--auto_trans_ckpt", "False", "--device_target", "CPU",
            "--output_dir", str(setup["root"] / "out"),
            "--options", "model.model_config.compute_dtype=float32", "model.model_config.param_init_type=float32",
            *options]


def hf_greedy_ids(setup, question=QUESTION):
    tokenizer = LlavaTokenizer(TOKENIZER)
    processor = LlavaProcessor(tokenizer, num_image_features=4, max_length=128, image_size=28)
    inputs = processor([question], [setup["image"]])
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        out = setup["hf"].generate(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(inputs["pixel_values"]),
                                   max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist(), tokenizer


def run_cli(setup, **kwargs):
    return subprocess.run([sys.executable, os.path.join(REPO, "run_mindformer.py"), *command(setup, **kwargs)],
                          capture_output=True, text=True, cwd=str(setup["root"]), timeout=300)


def test_predict_gives_hf_greedy_tokens(setup):
    result = run_cli(setup)
    assert result.returncode == 0, result.stderr
    with open(setup["root"] / "out" / "predict_results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    expected, tokenizer = hf_greedy_ids(setup)
    assert len(rows) == 1
    assert rows[0]["token_ids"] == expected
    assert rows[0]["image"] == setup["image"] and rows[0]["prompt"] == QUESTION
    assert rows[0]["text"] == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert rows[0]["text"] in result.stdout
    # Quiet by default: one line says what runs on CPU (the 7B YAML compiles prompts, which CPU runs op by op).
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.splitlines() if line.startswith(
        "CPU: weights float32, matmuls by llava-ms kernels")] and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(setup["root"] / "modules")  # MindFormers' module cache stays under output_dir


def run_failing(setup, **kwargs):
    result = run_cli(setup, **kwargs)
    error = result.stderr.strip()
    assert result.returncode == 2, error
    assert len(error.splitlines()) == 1, error
    assert error.startswith("run_mindformer.py: error: ")
    return error


def test_missing_image(setup):
    assert "does not exist" in run_failing(setup, image=str(setup["root"] / "nope.jpg"))


def test_unsupported_image_type(setup):
    path = setup["root"] / "notes.txt"
    path.write_text("not an image")
    error = run_failing(setup, image=str(path))
    assert "notes.txt" in error and "png" in error


def test_corrupt_image(setup):
    path = setup["root"] / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert "broken.png" in run_failing(setup, image=str(path))


def test_checkpoint_that_does_not_fit_the_config(setup, tmp_path):
    # The converted checkpoint says its sizes: a size given otherwise is named with the checkpoint's.
    error = run_failing(setup, options=["model.model_config.text_config.model_config.num_layers=3"])
    assert error.endswith("--options model.model_config.text_config.model_config.num_layers=3 contradicts the "
                          "checkpoint, whose num_layers is 2")
    # A lone safetensors file says nothing: its tensors are checked against the config, by name and shape.
    shutil.copy(setup["root"] / "hf" / "model.safetensors", tmp_path / "model.safetensors")
    lone = str(tmp_path / "model.safetensors")
    error = run_failing(setup, checkpoint=lone, options=["model.model_config.text_config.model_config.num_layers=3"])
    assert "missing tensor 'language_model.layers.2." in error
    error = run_failing(setup, checkpoint=lone,
                        options=["model.model_config.text_config.model_config.intermediate_size=96"])
    assert "has shape" in error and "expects" in error


def test_prompt_longer_than_the_context(setup):
    error = run_failing(setup, question="word " * 200)
    assert "seq_length" in error or "context" in error


def test_wrong_vocab_file(setup):
    error = run_failing(setup, options=[f"processor.tokenizer.vocab_file={setup['image']}"])
    assert "photo.png" in error


def test_two_examples_in_one_batch(setup):
    """--predict_batch_size 2: two IMAGE TEXT pairs generated together; each row equals HF greedy alone."""
    rng = np.random.default_rng(1)
    second_image = str(setup["root"] / "second.png")
    Image.fromarray((rng.random((30, 30, 3)) * 255).astype(np.uint8)).save(second_image)
    command_line = command(setup)
    data = command_line.index("--predict_data")
    command_line[data + 1:data + 3] = [setup["image"], QUESTION, second_image, "And the colours?"]
    result = subprocess.run([sys.executable, os.path.join(REPO, "run_mindformer.py"), *command_line,
                             "--predict_batch_size", "2"], capture_output=True, text=True, cwd=str(setup["root"]),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    with open(setup["root"] / "out" / "predict_results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [row["image"] for row in rows] == [setup["image"], second_image]
    assert rows[0]["token_ids"] == hf_greedy_ids(setup)[0]
    assert rows[1]["token_ids"] == hf_greedy_ids(dict(setup, image=second_image), "And the colours?")[0]


def result_rows(setup):
    with open(setup["root"] / "out" / "predict_results.jsonl") as f:
        return [json.loads(line) for line in f]


def test_graph_mode_gives_the_same_tokens(setup):
    """--mode 0 (MindSpore's graph mode, the YAML's context.mode) answers as PyNative does."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "run_mindformer.py"), *command(setup), "--mode", "0"],
                            capture_output=True, text=True, cwd=str(setup["root"]), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result_rows(setup)[0]["token_ids"] == hf_greedy_ids(setup)[0]


def test_seed_makes_sampling_reproducible(setup):
    sampling = ["model.model_config.do_sample=True", "model.model_config.temperature=3.0"]
    runs = []
    for seed in (3, 3, 4):
        result = subprocess.run([sys.executable, os.path.join(REPO, "run_mindformer.py"),
                                 *command(setup, options=sampling), "--seed", str(seed)],
                                capture_output=True, text=True, cwd=str(setup["root"]), timeout=300)
        assert result.returncode == 0, result.stderr
        runs.append(result_rows(setup)[0]["token_ids"])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert runs[0] != hf_greedy_ids(setup)[0]


# ----------------------------------------------------------------------------------------------------------
# An HF folder as it is: the 7B YAML unchanged, the sizes, vocabulary and normalization from the folder.
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_224(tmp_path_factory):
    """A tiny LLaVA at 224 px saved as an HF folder with LLaMA-2's tokenizer.model and a preprocessor config."""
    root = tmp_path_factory.mktemp("hf224")
    hf_model = make_hf_llava("small", seed=12, image_size=224)
    folder = save_hf_checkpoint(hf_model, str(root / "llava-224"), shards=2)
    shutil.copyfile(TOKENIZER, os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": {"height": 224, "width": 224}, "image_mean": [0.5, 0.5, 0.5],
                   "image_std": [0.25, 0.25, 0.25], "size": {"shortest_edge": 224}}, f)
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((300, 260, 3)) * 255).astype(np.uint8)).save(root / "photo.png")
    return {"root": root, "hf": hf_model, "folder": folder, "image": str(root / "photo.png")}


# Runs the command in a child of a small Python process that prints the child's peak RSS (kB) last on stderr.
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run_7b_yaml(folder_224, *extra, folder=None):
    """run_mindformer.py with the unchanged 7B YAML, --device_target CPU and an HF folder -> the completed
    process, its stderr without the last line, which is the run's peak RSS in MB (`peak_mb`)."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, sys.executable, os.path.join(REPO, "run_mindformer.py"), "--config", YAML_7B,
         "--register_path", os.path.join(REPO, "research", "llava"), "--predict_data", folder_224["image"], QUESTION,
         "--modal_type", "image", "text", "--load_checkpoint", folder or folder_224["folder"], "--device_target",
         "CPU", "--output_dir", str(folder_224["root"] / "out"), *extra],
        capture_output=True, text=True, cwd=str(folder_224["root"]), timeout=300)
    *lines, peak = result.stderr.rstrip("\n").split("\n")
    result.stderr, result.peak_mb = "\n".join(lines), int(peak) / 1024
    return result


def test_hf_folder_with_the_7b_yaml(folder_224):
    """Only --load_checkpoint: a 224-px model answers with HF's greedy tokens through the unchanged 7B YAML."""
    result = run_7b_yaml(folder_224, "--options", f"model.model_config.max_new_tokens={NEW_TOKENS}")
    assert result.returncode == 0, result.stderr
    tokenizer = LlavaTokenizer(TOKENIZER)
    features = (224 // 14) ** 2
    processor = LlavaProcessor(tokenizer, num_image_features=features, image_size=224, image_mean=(0.5, 0.5, 0.5),
                               image_std=(0.25, 0.25, 0.25))
    inputs = processor([QUESTION], [folder_224["image"]])
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        out = folder_224["hf"].generate(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(inputs["pixel_values"]),
                                        max_new_tokens=NEW_TOKENS, do_sample=False)
    with open(folder_224["root"] / "out" / "predict_results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]["token_ids"] == out[0, len(ids):].tolist()
    # One line each says what changed from the YAML: the sizes, and the CPU plan.
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("model sizes from the checkpoint:") and "image_size 336 -> 224" in lines[0]
    assert lines[1].startswith("CPU: weights float16, matmuls by llava-ms kernels")


def test_an_explicit_size_that_contradicts_the_folder_is_refused(folder_224):
    result = run_7b_yaml(folder_224, "--options", "model.model_config.vision_config.model_config.image_size=336")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "run_mindformer.py: error: --options model.model_config.vision_config.model_config.image_size=336 "
        "contradicts the checkpoint, whose image_size is 224")


@pytest.mark.parametrize("damage, message", [
    ("config.json", "has no config.json: an HF checkpoint folder needs one"),
    ("model-00002-of-00002.safetensors", "lists shard model-00002-of-00002.safetensors, which is missing"),
])
def test_bad_folders_are_one_line(folder_224, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(folder_224["folder"], broken)
    os.remove(broken / damage)
    result = run_7b_yaml(folder_224, folder=str(broken))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_a_16_bit_folder_loads_without_a_float32_copy(folder_224, tmp_path):
    """A 200M-parameter LLaVA saved in float16 (400 MB; 800 MB in float32) answers through the unchanged 7B YAML
    with its weights kept in 16 bits: the run's peak RSS exceeds the tiny 224-px model's run by less than 1.5x
    the 16-bit weights. Building the model in float32, a float32 copy of the weights in a compiled graph, or
    reading the whole file before placing it would each add 400-800 MB more."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,  # pylint: disable=import-outside-toplevel
                              LlavaForConditionalGeneration)

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=28, patch_size=14, projection_dim=64, hidden_act="quick_gelu"),
        text_config=LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8,
                                vocab_size=32064, tie_word_embeddings=False, max_position_embeddings=4096),
        image_token_index=32000, vision_feature_layer=-2, image_seq_length=4, pad_token_id=32001)
    hf_model = LlavaForConditionalGeneration(config).to(torch.float16)
    weights_mb = sum(p.numel() for p in hf_model.parameters()) * 2 / 2 ** 20
    folder = save_hf_checkpoint(hf_model, str(tmp_path / "llava-200m"))
    del hf_model
    shutil.copyfile(TOKENIZER, os.path.join(folder, "tokenizer.model"))

    baseline = run_7b_yaml(folder_224, "--options", "model.model_config.max_new_tokens=4")
    large = run_7b_yaml(folder_224, "--options", "model.model_config.max_new_tokens=4", folder=folder)
    assert baseline.returncode == 0 and large.returncode == 0, large.stderr
    assert "CPU: weights float16" in large.stderr
    assert large.peak_mb - baseline.peak_mb < 1.5 * weights_mb, (large.peak_mb, baseline.peak_mb, weights_mb)
