"""The bundled tiny LLaVA really sees: accuracy on 200 fresh images per question type, different images give
different right answers to the same question, and `make demo` prints the right answers for the demo image.

Questions go through the same path as `run_mindformer.py --run_mode predict`: the predict YAML's model,
tokenizer and processor built through MindFormers' registry, the bundled checkpoint, processor -> greedy
`generate` -> decode.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import shapes_task
from llava_weights import load_weights
from llava_runtime import build_components, set_up_context
from run_mindformer import load_config, parse_args, register_plugin
from conftest import PLUGIN, REPO, TINY
from llava_generation import answer
from train_llava import format_scores

set_up_context("CPU", mode=1)

TEST_SEED = 20250101  # training streams use seed 1; these images were never seen
NUM_IMAGES = 200
TARGETS = {"color": 0.95, "shape": 0.95, "count": 0.90, "describe": 0.80}


@pytest.fixture(scope="module")
def bundled():
    register_plugin(PLUGIN)
    args = parse_args(["--config", os.path.join(TINY, "predict_llava_tiny.yaml"),
                       "--options", f"processor.tokenizer.vocab_file={os.path.join(TINY, 'tokenizer.model')}"])
    config = load_config(args)
    model, tokenizer, processor = build_components(config)
    load_weights(model, os.path.join(TINY, "llava_tiny.ckpt"))
    return model, tokenizer, processor


def ask(bundled, questions, images):
    model, tokenizer, processor = bundled
    return [result["text"] for result in answer(model, tokenizer, processor, questions, images, batch_size=16)]


def test_accuracy_on_fresh_images(bundled):
    """200 fresh images; every unambiguous question of each type about each of them."""
    rng = np.random.default_rng(TEST_SEED)
    items = []
    for _ in range(NUM_IMAGES):
        scene = shapes_task.random_scene(rng)
        image = shapes_task.render(scene)
        items += [(question_type, question, answer, image)
                  for question_type, question, answer in shapes_task.questions(scene)]
    answers = ask(bundled, [q for _, q, _, _ in items], [image for *_, image in items])
    scores, wrong = {}, []
    for (question_type, question, expected, _), answer in zip(items, answers):
        score = scores.setdefault(question_type, {"correct": 0, "total": 0})
        score["total"] += 1
        score["correct"] += answer == expected
        if answer != expected:
            wrong.append(f"{question!r}: {answer!r} != {expected!r}")
    for score in scores.values():
        score["accuracy"] = score["correct"] / score["total"]
    print(f"\naccuracy on {NUM_IMAGES} fresh images: {format_scores(scores)}")
    assert set(scores) == set(TARGETS)
    failing = {t: scores[t]["accuracy"] for t in TARGETS if scores[t]["accuracy"] < TARGETS[t]}
    assert not failing, f"{format_scores(scores)}; first mistakes: {wrong[:10]}"


def two_scenes_that_differ(question_type):
    """Two fresh scenes and a question that both can answer, with different right answers."""
    rng = np.random.default_rng(TEST_SEED + 1)
    while True:
        first, second = shapes_task.random_scene(rng), shapes_task.random_scene(rng)
        answers_first = {q: a for t, q, a in shapes_task.questions(first) if t == question_type}
        answers_second = {q: a for t, q, a in shapes_task.questions(second) if t == question_type}
        for question in sorted(answers_first.keys() & answers_second.keys()):
            if answers_first[question] != answers_second[question]:
                return question, (first, answers_first[question]), (second, answers_second[question])


@pytest.mark.parametrize("question_type", shapes_task.QUESTION_TYPES)
def test_the_image_decides_the_answer(bundled, question_type):
    question, (first, expected_first), (second, expected_second) = two_scenes_that_differ(question_type)
    answers = ask(bundled, [question, question], [shapes_task.render(first), shapes_task.render(second)])
    assert answers == [expected_first, expected_second]
    assert answers[0] != answers[1]


def test_same_picture_answers_each_question(bundled):
    """One image, a question of every type: the answers agree with each other and with the picture."""
    scene = shapes_task.demo_scene()
    items = shapes_task.questions(scene)
    image = shapes_task.render(scene)
    answers = ask(bundled, [q for _, q, _ in items], [image] * len(items))
    assert answers == [a for _, _, a in items]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_weights_and_bfloat16_arithmetic_answer_as_hf_fp32(dtype, kernel_paths):
    """The bundled model stored in 16 bits and every product forced through the bfloat16 prompt path (on a CPU
    that has it) gives HF fp32's greedy answers on the same values, token for token, for every question about
    eight fresh pictures: a trained model's predictions are confident, so bfloat16 rounding must not change one."""
    import torch  # pylint: disable=import-outside-toplevel
    from hf_reference import hf_llava_from  # pylint: disable=import-outside-toplevel

    register_plugin(PLUGIN)
    config = load_config(parse_args(["--config", os.path.join(TINY, "predict_llava_tiny.yaml"), "--options",
                                     f"processor.tokenizer.vocab_file={os.path.join(TINY, 'tokenizer.model')}",
                                     f"model.model_config.param_init_type={dtype}"]))
    model, _, processor = build_components(config)
    load_weights(model, os.path.join(TINY, "llava_tiny.ckpt"))
    assert str(model.lm_head.weight.dtype).lower() == dtype
    reference = hf_llava_from(model)
    kernel_paths(m_large=1)
    rng = np.random.default_rng(TEST_SEED + 2)
    scenes = [shapes_task.random_scene(rng) for _ in range(8)]
    items = [(question, shapes_task.render(scene)) for scene in scenes for _, question, _ in shapes_task.questions(scene)]
    inputs = processor([question for question, _ in items], [image for _, image in items])
    ours = model.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=16)
    for index, ids in enumerate(inputs["input_ids"]):
        with torch.no_grad():
            expected = reference.generate(input_ids=torch.tensor([ids]),
                                          pixel_values=torch.tensor(inputs["pixel_values"][index:index + 1]),
                                          max_new_tokens=16, do_sample=False, pad_token_id=0)[0].tolist()
        assert list(ours[index]) == expected, items[index][0]


def make_demo_lines():
    """The command lines `make demo` runs (read from the Makefile, so the test runs what users run)."""
    output = subprocess.run(["make", "-n", "-s", "-o", ".venv/.installed", "demo"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    return [line for line in output.splitlines() if "run_mindformer.py" in line]


def test_make_demo_in_a_fresh_copy(tmp_path):
    """`make demo` in a copy of the repository's files (no output/, no modules/, no caches), the venv shared."""
    clone = tmp_path / "clone"
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "output", "modules", ".venv", ".git", "*.log")
    shutil.copytree(REPO, clone, ignore=ignore)
    os.symlink(os.path.join(REPO, ".venv"), clone / ".venv")
    result = subprocess.run(["make", "-s", "-o", ".venv/.installed", "demo"], cwd=clone, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(make_demo_lines()) == 1
    with open(os.path.join(TINY, "demo.json"), encoding="utf-8") as f:
        spec = json.load(f)
    right = {item["question"]: item["answer"] for item in spec["questions"]}
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    asked = [line for line in lines if line in right]
    assert len(asked) >= 3, result.stdout
    for question in asked:
        assert lines[lines.index(question) + 1] == right[question], result.stdout
