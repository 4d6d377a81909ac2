"""Training on the shapes task: the training command runs a few steps and its loss falls, the loss covers the
answer tokens only, the compiled training forward is LlavaVlm's forward, the loss and its gradients equal
HuggingFace's LLaVA in torch, a run is reproducible from its seed, and the saved checkpoint loads into the model."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

import shapes_task
from conftest import PLUGIN, REPO, TINY
from llava_checkpoint import METADATA_NAME, iter_checkpoint
from llava_weights import load_weights
from llava_layout import checkpoint_layout
from llava_runtime import build_components, set_up_context
from run_mindformer import load_config, parse_args, register_plugin
from train_llava import AnswerLoss, ShapesBatcher, initialize_weights, run_finetune
from llava_weights import save_weights

set_up_context("CPU", mode=1)

FINETUNE_YAML = os.path.join(TINY, "finetune_llava_tiny.yaml")
PREDICT_YAML = os.path.join(TINY, "predict_llava_tiny.yaml")
VOCAB = os.path.join(TINY, "tokenizer.model")
STEP_LINE = re.compile(r"^step (\d+)/(\d+)\s+loss ([0-9.]+)\s+lr ([0-9.e+-]+)\s+elapsed (\d+)s", re.M)


def finetune_config(tmp_path, *options):
    register_plugin(PLUGIN)
    args = parse_args(["--config", FINETUNE_YAML, "--run_mode", "finetune", "--output_dir", str(tmp_path),
                       "--options", f"train_dataset.processor.tokenizer.vocab_file={VOCAB}",
                       f"trainer.save_checkpoint={tmp_path / 'model.ckpt'}", "trainer.eval_samples=0", *options])
    return load_config(args)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    config = finetune_config(tmp_path_factory.mktemp("components"))
    ms.set_seed(0)
    model, tokenizer, processor = build_components(config, config.train_dataset.processor)
    model.init_weights()
    return config, model, tokenizer, processor


def test_finetune_command_runs_and_loss_falls(tmp_path):
    """The documented command, cut to 16 steps of 16 examples: progress lines, a falling loss, a checkpoint."""
    checkpoint = tmp_path / "trained.ckpt"
    command = [sys.executable, "run_mindformer.py", "--config", FINETUNE_YAML, "--register_path", "research/llava",
               "--run_mode", "finetune", "--output_dir", str(tmp_path),
               "--options", "train_dataset.num_samples=256", "runner_config.batch_size=16", "trainer.log_interval=1",
               "trainer.eval_samples=8", f"trainer.save_checkpoint={checkpoint}", "trainer.save_dtype=float16",
               "lr_schedule.warmup_ratio=0.0",
               "lr_schedule.learning_rate=2.0e-3"]  # few steps: a larger step than the full run
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    steps = [(int(s), int(n), float(loss), float(lr)) for s, n, loss, lr, _ in STEP_LINE.findall(result.stdout)]
    assert [s for s, *_ in steps] == list(range(1, 17)) and steps[0][1] == 16, result.stdout
    losses = np.array([loss for _, _, loss, _ in steps])
    assert np.isfinite(losses).all()
    # From the untrained ln(vocab) ~ 5.3 to well below it, although step 6 moves from single shapes described
    # to the full question mix (the data schedule of the YAML, cut to 16 steps), which raises the loss for a while.
    assert losses[-4:].mean() < 0.6 * losses[0], losses
    assert steps[0][3] > steps[-1][3]  # the cosine schedule decays
    assert "held-out accuracy (8 fresh examples)" in result.stdout
    assert checkpoint.exists() and "checkpoint written to" in result.stdout
    assert {array.dtype for _, array in iter_checkpoint(str(checkpoint))} == {np.dtype(np.float16)}


def test_same_seed_same_run(tmp_path):
    options = ("train_dataset.num_samples=24", "runner_config.batch_size=8", "trainer.log_interval=1")
    first = run_finetune(finetune_config(tmp_path / "a", *options), log=lambda _: None)
    second = run_finetune(finetune_config(tmp_path / "b", *options), log=lambda _: None)
    assert first["losses"] == second["losses"]
    weights_a = dict(iter_checkpoint(first["checkpoint"]))
    weights_b = dict(iter_checkpoint(second["checkpoint"]))
    assert weights_a.keys() == weights_b.keys()
    assert all(np.array_equal(weights_a[name], weights_b[name]) for name in weights_a)
    third = run_finetune(finetune_config(tmp_path / "c", *options, "seed=5"), log=lambda _: None)
    assert third["losses"] != first["losses"]


def test_loss_covers_the_answer_and_eos_only(components):
    _, model, tokenizer, processor = components
    batcher = ShapesBatcher(tokenizer, processor)
    examples = shapes_task.sample_examples(11, 12)
    arrays = batcher(examples)
    assert arrays["input_ids"].shape == (12, batcher.length)
    assert arrays["pixel_values"].shape == (12, 3, 48, 48)
    for row, example in enumerate(examples):
        prompt = processor.encode_prompt(example.question, 1)
        assert arrays["input_ids"][row, :len(prompt)].tolist() == prompt
        targets = arrays["labels"][row][arrays["weights"][row] > 0].tolist()
        assert targets[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(targets, skip_special_tokens=True).strip() == example.answer
        assert arrays["weights"][row, :len(prompt) - 1].sum() == 0


def test_rows_fit_the_context_and_the_longest_answer(components):
    _, model, tokenizer, processor = components
    batcher = ShapesBatcher(tokenizer, processor)
    assert batcher.length <= model.config.seq_length
    longest = max(shapes_task.all_question_answers(), key=lambda pair: len(batcher.row(*pair)[0]))
    assert len(batcher.row(*longest)[0]) == batcher.length
    scene = shapes_task.random_scene(np.random.default_rng(0), 3)
    arrays = batcher([shapes_task.Example(scene, "describe", *longest)])
    assert arrays["input_ids"][0, -1] == tokenizer.eos_token_id  # the longest row fills it: no padding
    too_long = shapes_task.Example(scene, "describe", longest[0], longest[1] + " " + longest[1])
    with pytest.raises(ValueError, match="tokens, over"):
        batcher([too_long])


def test_training_forward_is_the_model_forward(components):
    _, model, tokenizer, processor = components
    batcher = ShapesBatcher(tokenizer, processor)
    arrays = batcher(shapes_task.sample_examples(12, 4))
    text_ids, merge_index = model.merge_plan(arrays["input_ids"], len(arrays["pixel_values"]))
    ours = AnswerLoss(model, batcher.length).logits(Tensor(text_ids), Tensor(merge_index),
                                                     Tensor(arrays["pixel_values"]))
    reference = model(Tensor(arrays["input_ids"]), Tensor(arrays["pixel_values"]))
    np.testing.assert_allclose(ours.asnumpy(), reference.asnumpy(), rtol=1e-5, atol=1e-5)


def test_fresh_weights_scale_with_the_input_size(components):
    """fan_in init: U(-1/sqrt(in), 1/sqrt(in)) for linears stored [in, out] and [out, in] alike (the model is
    built from the YAML, so its Linear is MindFormers' auto_register copy: the layout must be read from it)."""
    _, model, _, _ = components
    initialize_weights(model, seed=0)
    params = dict(model.parameters_and_names())
    for name, in_features in (("vision_tower.layers.0.mlp.fc1.weight", 96), ("vision_tower.layers.0.mlp.fc2.weight", 384),
                              ("language_model.layers.0.mlp.up_proj.weight", 128),
                              ("language_model.layers.0.mlp.down_proj.weight", 352)):
        largest = np.abs(params[name].asnumpy()).max()
        assert 0.95 / np.sqrt(in_features) < largest <= 1 / np.sqrt(in_features), name


def test_saved_checkpoint_loads_back(components, tmp_path):
    config, model, _, _ = components
    path = str(tmp_path / "saved.ckpt")
    save_weights(model, path)
    names = [name for name, _ in iter_checkpoint(path)]
    assert set(names) == set(checkpoint_layout(model.config))
    ms.set_seed(99)
    other, _, _ = build_components(config, config.train_dataset.processor)
    load_weights(other, path)
    for (name, a), (_, b) in zip(model.parameters_and_names(), other.parameters_and_names()):
        assert np.array_equal(a.asnumpy(), b.asnumpy()), name
    assert set(ms.load_checkpoint(path)) == set(names) | {METADATA_NAME}  # MindSpore's own reader accepts it too
    half = str(tmp_path / "half.ckpt")
    save_weights(model, half, "float16")
    assert os.path.getsize(half) < 0.6 * os.path.getsize(path)


def test_predict_and_finetune_yamls_describe_the_same_model():
    register_plugin(PLUGIN)
    predict = load_config(parse_args(["--config", PREDICT_YAML]))
    finetune = load_config(parse_args(["--config", FINETUNE_YAML]))
    assert predict.model == finetune.model
    assert predict.processor == finetune.train_dataset.processor
    assert predict.context.device_target == "CPU" and predict.model.model_config.compute_dtype == "float32"


def test_loss_and_gradients_match_huggingface(tmp_path):
    """The training loss of a converted random HF LLaVA and its gradients, against torch autograd."""
    import torch

    from convert_weight import convert_llava
    from hf_reference import IMAGE_TOKEN_ID, make_hf_llava, save_hf_checkpoint
    from llava_config import LlavaConfig
    from llava_model import LlavaVlm

    hf = make_hf_llava("small", seed=3).float()
    save_hf_checkpoint(hf, str(tmp_path / "hf"))
    convert_llava(str(tmp_path / "hf"), str(tmp_path / "llava.ckpt"), progress=False)
    hf_config = hf.config
    config = LlavaConfig(vision_config=dict(hf_config.vision_config.to_dict(),
                                            vision_feature_layer=hf_config.vision_feature_layer,
                                            vision_feature_select_strategy=hf_config.vision_feature_select_strategy),
                         text_config=hf_config.text_config.to_dict(), image_token_id=IMAGE_TOKEN_ID, seq_length=64,
                         cpu_kernels=False)  # training runs MindSpore's MatMul: the CPU kernels have no gradient
    model = LlavaVlm(config)
    load_weights(model, str(tmp_path / "llava.ckpt"))
    features = model.num_image_features
    rng = np.random.default_rng(0)
    length = 4 + features + 8
    ids = rng.integers(3, 31000, (2, length)).astype(np.int32)
    ids[:, 4:4 + features] = IMAGE_TOKEN_ID
    size = hf_config.vision_config.image_size
    pixels = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    labels = np.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    weights = np.zeros(ids.shape, np.float32)
    weights[:, -6:-1] = 1.0

    logits = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels)).logits
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(labels, dtype=torch.long)[..., None])[..., 0]
    torch_loss = (nll * torch.tensor(weights)).sum() / weights.sum()
    torch_loss.backward()
    torch_grads = {name: p.grad.numpy() for name, p in hf.named_parameters() if p.grad is not None}

    text_ids, merge_index = model.merge_plan(ids, len(pixels))
    params = model.trainable_params()
    names = {id(p): name for name, p in model.parameters_and_names()}
    grad_fn = ms.jit(ms.value_and_grad(AnswerLoss(model, length), None, params))
    loss, grads = grad_fn(Tensor(text_ids), Tensor(merge_index), Tensor(pixels), Tensor(labels), Tensor(weights))
    np.testing.assert_allclose(float(loss.asnumpy()), float(torch_loss.detach()), rtol=1e-5)
    ours = {names[id(p)]: g.asnumpy() for p, g in zip(params, grads)}
    pairs = {"vision_tower.embeddings.patch_embedding.weight":
             "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
             "vision_tower.layers.0.self_attn.q_proj.weight":
             "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
             "vision_tower.layers.1.mlp.fc1.weight": "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
             "projector.linear_1.weight": "model.multi_modal_projector.linear_1.weight",
             "language_model.layers.0.self_attn.k_proj.weight": "model.language_model.layers.0.self_attn.k_proj.weight",
             "language_model.layers.1.mlp.up_proj.weight": "model.language_model.layers.1.mlp.up_proj.weight",
             "language_model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
             "lm_head.weight": "lm_head.weight"}
    for name, torch_name in pairs.items():
        reference = torch_grads[torch_name]
        reference = reference.reshape(ours[name].shape)  # our layout is HF's (the patch embedding flattened)
        scale = np.abs(reference).max()
        assert scale > 0, name
        np.testing.assert_allclose(ours[name], reference, rtol=0, atol=1e-4 * scale, err_msg=name)
