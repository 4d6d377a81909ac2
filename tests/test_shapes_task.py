"""The synthetic shapes task: deterministic scenes, unambiguous questions, left-to-right descriptions, and the
bundled tokenizer and demo image being exactly what `tiny_assets.py` regenerates."""
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

import shapes_task
import tiny_assets
from llava_tokenizer import LlavaTokenizer

from conftest import TINY


def test_same_seed_same_examples_and_pixels():
    first = shapes_task.sample_examples(123, 40)
    second = shapes_task.sample_examples(123, 40)
    assert first == second
    for a, b in zip(first[:10], second[:10]):
        assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert shapes_task.sample_examples(124, 40) != first


def test_stream_is_reproducible_and_not_periodic():
    stream = shapes_task.example_stream(5, chunk=16)
    first = list(itertools.islice(stream, 48))
    again = list(itertools.islice(shapes_task.example_stream(5, chunk=16), 48))
    assert first == again
    assert first[:16] != first[16:32]


def test_scene_layout_rules():
    """Each shape inside its own cell of the board, one per column (so left to right is unambiguous)."""
    rng = np.random.default_rng(0)
    counts, sizes = set(), set()
    cell = 1.0 / shapes_task.GRID
    for _ in range(500):
        scene = shapes_task.random_scene(rng)
        counts.add(len(scene.shapes))
        sizes.add(scene.size)
        xs = [shape.x for shape in scene.shapes]
        assert xs == sorted(xs)
        columns = [int(shape.x // cell) for shape in scene.shapes]
        assert len(set(columns)) == len(columns)
        for shape in scene.shapes:
            column, row = int(shape.x // cell), int(shape.y // cell)
            margin = shapes_task.CELL_MARGIN * cell - 1e-3
            assert column * cell + margin <= shape.x - shape.radius and shape.x + shape.radius <= (column + 1) * cell - margin
            assert row * cell + margin <= shape.y - shape.radius and shape.y + shape.radius <= (row + 1) * cell - margin
            assert shapes_task.RADIUS_RANGE[0] * cell - 1e-3 <= shape.radius <= shapes_task.RADIUS_RANGE[1] * cell + 1e-3
    assert counts == {1, 2, 3}
    assert sizes == set(shapes_task.RENDER_SIZES)


def test_max_shapes_limits_the_scene():
    rng = np.random.default_rng(2)
    assert {len(shapes_task.random_scene(rng, max_shapes=1).shapes) for _ in range(50)} == {1}
    examples = shapes_task.sample_examples(5, 30, {"describe": 1.0}, max_shapes=1)
    assert all(len(e.scene.shapes) == 1 and e.answer.count(" a ") == 0 for e in examples)


def test_render_draws_each_shape_in_its_colour():
    shapes = (shapes_task.Shape("square", "red", 0.25, 0.5, 0.15, (215, 35, 35)),
              shapes_task.Shape("circle", "blue", 0.75, 0.5, 0.15, (40, 75, 225)))
    image = np.asarray(shapes_task.render(shapes_task.Scene(shapes, 128, 0.0, 0, 100)))
    assert image.shape == (100, 100, 3)
    assert tuple(image[50, 25]) == (215, 35, 35)
    assert tuple(image[50, 75]) == (40, 75, 225)
    assert tuple(image[5, 5]) == (128, 128, 128)


def test_questions_are_unambiguous():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = shapes_task.random_scene(rng)
        kinds = [s.kind for s in scene.shapes]
        colors = [s.color for s in scene.shapes]
        for question_type, question, answer in shapes_task.questions(scene):
            if question_type == "color":
                kind = question[len("What color is the "):-1]
                assert kinds.count(kind) == 1
                assert answer == f"The {kind} is {colors[kinds.index(kind)]}."
            elif question_type == "shape":
                color = question[len("What shape is "):-1]
                assert colors.count(color) == 1
                assert answer == f"The {color} shape is a {kinds[colors.index(color)]}."


def test_answers_read_as_sentences():
    make = shapes_task.Shape
    scene = shapes_task.Scene((make("circle", "red", 0.2, 0.5, 0.1, (0, 0, 0)),
                               make("square", "blue", 0.5, 0.2, 0.1, (0, 0, 0)),
                               make("triangle", "green", 0.8, 0.7, 0.1, (0, 0, 0))), 0, 0.0, 0, 64)
    assert shapes_task.describe(scene) == "A red circle, a blue square and a green triangle."
    assert shapes_task.describe(shapes_task.Scene(scene.shapes[:2], 0, 0.0, 0, 64)) == "A red circle and a blue square."
    assert shapes_task.describe(shapes_task.Scene(scene.shapes[:1], 0, 0.0, 0, 64)) == "A red circle."
    assert shapes_task.count_answer(1) == "There is one shape."
    assert shapes_task.count_answer(3) == "There are three shapes."
    assert ("color", "What color is the circle?", "The circle is red.") in shapes_task.questions(scene)
    assert ("shape", "What shape is red?", "The red shape is a circle.") in shapes_task.questions(scene)


def test_every_answer_is_in_the_vocabulary_text():
    texts = set(shapes_task.all_texts())
    pairs = set(shapes_task.all_question_answers())
    for example in shapes_task.sample_examples(3, 300):
        assert example.question in texts and example.answer in texts
        assert (example.question, example.answer) in pairs
    assert len(pairs) == 3 + 4 * 5 + 5 * 4 + sum(20 ** n for n in (1, 2, 3))


def test_scene_round_trips_through_json():
    scene = shapes_task.random_scene(np.random.default_rng(9))
    assert shapes_task.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_bundled_tokenizer_is_what_tiny_assets_trains(tmp_path):
    path = tiny_assets.train_vocab(str(tmp_path / "tokenizer.model"))
    with open(path, "rb") as fresh, open(os.path.join(TINY, "tokenizer.model"), "rb") as bundled:
        assert fresh.read() == bundled.read()


def test_tokenizer_covers_the_task_in_whole_words():
    tokenizer = LlavaTokenizer(os.path.join(TINY, "tokenizer.model"))
    assert (tokenizer.image_token_id, tokenizer.pad_token_id, len(tokenizer)) == (192, 193, 194)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    ids = tokenizer("A purple square, a green cross and a red circle.")["input_ids"]
    assert len(ids) == 13  # BOS + one piece per word and punctuation mark
    assert tokenizer.unk_token_id not in tokenizer("Is the Zebra #1? {x} ~ [y]")["input_ids"]


def test_bundled_demo_is_the_seeded_scene():
    with open(os.path.join(TINY, "demo.json"), encoding="utf-8") as f:
        spec = json.load(f)
    scene = shapes_task.demo_scene(spec["seed"])
    assert shapes_task.Scene.from_dict(spec["scene"]) == scene
    assert [(q["type"], q["question"], q["answer"]) for q in spec["questions"]] == shapes_task.questions(scene)
    with Image.open(os.path.join(TINY, "demo.png")) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(shapes_task.render(scene)))


@pytest.mark.parametrize("question_type", shapes_task.QUESTION_TYPES)
def test_question_weights_select_types(question_type):
    examples = shapes_task.sample_examples(4, 30, {question_type: 1.0})
    assert {e.question_type for e in examples} == {question_type}
