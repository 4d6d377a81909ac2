"""A synthetic vision-language task: pictures of one to three simple shapes, and questions about them.

Everything is generated in code from a seed, so a training run, a test set and the demo image are each
reproducible, and held-out images can be drawn fresh at any time.

Pictures: one to three shapes (circle, square, triangle, cross) in one of five colours (red, green, blue,
yellow, purple), each colour slightly jittered, on a plain or noisy grey background. The picture is a board
of GRID x GRID cells; each shape lies inside its own cell, in its own column, at a random size and a random
offset within the cell. (The tiny model's ViT has 16-pixel patches on a 48-pixel input: one patch per cell,
so a shape is never cut in pieces between patches, which a ViT this small and this briefly trained cannot
reassemble.) The canvas side is drawn from `RENDER_SIZES`, so the processor's resize to the model's input
size is part of what the model learns to read.

Questions (the exact strings; the answers are full sentences and are matched exactly):

    "What color is the circle?"   -> "The circle is red."        (asked only when exactly one circle)
    "How many shapes are there?"  -> "There are three shapes."   ("There is one shape." for one)
    "What shape is red?"          -> "The red shape is a circle." (asked only when exactly one red shape)
    "Describe the image."         -> "A red circle, a blue square and a green triangle."

Descriptions list the shapes from left to right; shapes are in different columns, so the order is never
ambiguous.
"""
import dataclasses
import json

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {  # RGB; each shape's colour is jittered by up to COLOR_JITTER per channel
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (235, 210, 30),
    "purple": (145, 50, 185),
}
COLOR_NAMES = tuple(COLORS)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
MAX_SHAPES = 3
RENDER_SIZES = (48, 64, 96, 128, 192)
COLOR_JITTER = 18
GRID = 3                     # the board is GRID x GRID cells; at most one shape per cell and per column
RADIUS_RANGE = (0.28, 0.42)  # a shape's half extent, as a fraction of the cell side
CELL_MARGIN = 0.04           # free space between a shape and its cell's border, fraction of the cell side
NOISE_STD_RANGE = (4.0, 28.0)  # noisy backgrounds: per-pixel Gaussian noise, in 0..255 units

QUESTION_TYPES = ("color", "count", "shape", "describe")
COUNT_QUESTION = "How many shapes are there?"
DESCRIBE_QUESTION = "Describe the image."


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str            # one of SHAPES
    color: str           # one of COLOR_NAMES
    x: float             # centre, fraction of the canvas width (0 left, 1 right)
    y: float             # centre, fraction of the canvas height (0 top)
    radius: float        # half extent, fraction of the canvas side
    rgb: tuple           # the jittered colour actually drawn


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple        # Shape, sorted left to right
    background: int      # grey level 0..255
    noise_std: float     # 0 for a plain background
    noise_seed: int
    size: int            # canvas side in pixels

    def to_dict(self):
        return {"shapes": [dataclasses.asdict(shape) for shape in self.shapes], "background": self.background,
                "noise_std": self.noise_std, "noise_seed": self.noise_seed, "size": self.size}

    @classmethod
    def from_dict(cls, data):
        shapes = tuple(Shape(**dict(shape, rgb=tuple(shape["rgb"]))) for shape in data["shapes"])
        return cls(shapes=shapes, background=int(data["background"]), noise_std=float(data["noise_std"]),
                   noise_seed=int(data["noise_seed"]), size=int(data["size"]))


# ----------------------------------------------------------------------------------------------- scenes

def random_scene(rng, num_shapes=None, size=None, max_shapes=MAX_SHAPES):
    """A random scene from `rng` (np.random.Generator); `num_shapes` (1..max_shapes) and `size` drawn when None."""
    num_shapes = int(rng.integers(1, max_shapes + 1)) if num_shapes is None else int(num_shapes)
    if not 1 <= num_shapes <= MAX_SHAPES:
        raise ValueError(f"num_shapes must be 1..{MAX_SHAPES}, got {num_shapes}")
    size = int(rng.choice(RENDER_SIZES)) if size is None else int(size)
    cell = 1.0 / GRID
    columns = rng.choice(GRID, size=num_shapes, replace=False)
    rows = rng.integers(0, GRID, size=num_shapes)
    placed = []
    for column, row in zip(columns, rows):
        radius = float(rng.uniform(*RADIUS_RANGE)) * cell
        slack = cell / 2 - radius - CELL_MARGIN * cell
        x, y = ((int(c) + 0.5) * cell + float(rng.uniform(-slack, slack)) for c in (column, row))
        placed.append((x, y, radius))
    shapes = []
    for x, y, radius in sorted(placed):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.asarray(COLORS[color]) + jitter, 0, 255))
        shapes.append(Shape(kind, color, round(x, 4), round(y, 4), round(radius, 4), rgb))
    noisy = rng.random() < 0.5
    noise_std = round(float(rng.uniform(*NOISE_STD_RANGE)), 2) if noisy else 0.0
    return Scene(shapes=tuple(shapes), background=int(rng.integers(0, 256)), noise_std=noise_std,
                 noise_seed=int(rng.integers(2 ** 31)), size=size)


def _outline(shape, size):
    """PIL drawing call for one shape on a canvas of `size` pixels: (method name, geometry)."""
    cx, cy, r = shape.x * size, shape.y * size, shape.radius * size
    if shape.kind == "circle":
        return "ellipse", [cx - r, cy - r, cx + r, cy + r]
    if shape.kind == "square":
        half = 0.86 * r
        return "rectangle", [cx - half, cy - half, cx + half, cy + half]
    if shape.kind == "triangle":
        return "polygon", [(cx, cy - r), (cx + 0.98 * r, cy + 0.8 * r), (cx - 0.98 * r, cy + 0.8 * r)]
    if shape.kind == "cross":
        arm = 0.36 * r
        return "polygon", [(cx - arm, cy - r), (cx + arm, cy - r), (cx + arm, cy - arm), (cx + r, cy - arm),
                           (cx + r, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + r), (cx - arm, cy + r),
                           (cx - arm, cy + arm), (cx - r, cy + arm), (cx - r, cy - arm), (cx - arm, cy - arm)]
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def render(scene):
    """The scene as an RGB PIL image of scene.size x scene.size pixels (deterministic)."""
    size = scene.size
    pixels = np.full((size, size, 3), float(scene.background), np.float32)
    if scene.noise_std:
        pixels += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise_std, pixels.shape)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        method, geometry = _outline(shape, size)
        getattr(draw, method)(geometry, fill=shape.rgb)
    return image


# ----------------------------------------------------------------------------------------------- questions

def _with_article(shape):
    return f"a {shape.color} {shape.kind}"


def describe(scene):
    """"A red circle, a blue square and a green triangle." (left to right)."""
    parts = [_with_article(shape) for shape in scene.shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def count_answer(count):
    return "There is one shape." if count == 1 else f"There are {NUMBER_WORDS[count]} shapes."


def color_question(kind):
    return f"What color is the {kind}?"


def color_answer(kind, color):
    return f"The {kind} is {color}."


def shape_question(color):
    return f"What shape is {color}?"


def shape_answer(color, kind):
    return f"The {color} shape is a {kind}."


def questions(scene):
    """Every unambiguous (question type, question, answer) about `scene`, in a fixed order."""
    kinds = [shape.kind for shape in scene.shapes]
    colors = [shape.color for shape in scene.shapes]
    items = []
    for shape in scene.shapes:
        if kinds.count(shape.kind) == 1:
            items.append(("color", color_question(shape.kind), color_answer(shape.kind, shape.color)))
    items.append(("count", COUNT_QUESTION, count_answer(len(scene.shapes))))
    for shape in scene.shapes:
        if colors.count(shape.color) == 1:
            items.append(("shape", shape_question(shape.color), shape_answer(shape.color, shape.kind)))
    items.append(("describe", DESCRIBE_QUESTION, describe(scene)))
    return items


def question_of_type(scene, question_type, rng):
    """One (question, answer) of `question_type` about `scene`, or None when that type would be ambiguous."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"question_type must be one of {QUESTION_TYPES}, got {question_type!r}")
    choices = [(q, a) for kind, q, a in questions(scene) if kind == question_type]
    if not choices:
        return None
    return choices[int(rng.integers(len(choices)))]


@dataclasses.dataclass(frozen=True)
class Example:
    scene: Scene
    question_type: str
    question: str
    answer: str

    def image(self):
        return render(self.scene)


def sample_examples(seed, count, weights=None, max_shapes=MAX_SHAPES):
    """`count` examples from `seed`: a fresh scene of 1..max_shapes shapes each, the question type drawn by
    `weights` (dict type -> weight; default: descriptions twice as often as each other type)."""
    weights = weights or {"color": 1.0, "count": 1.0, "shape": 1.0, "describe": 2.0}
    types = [t for t in QUESTION_TYPES if weights.get(t, 0) > 0]
    probs = np.asarray([weights[t] for t in types], np.float64)
    probs /= probs.sum()
    rng = np.random.default_rng(seed)
    examples = []
    while len(examples) < count:
        scene = random_scene(rng, max_shapes=max_shapes)
        question_type = types[int(rng.choice(len(types), p=probs))]
        qa = question_of_type(scene, question_type, rng)
        if qa is None:  # e.g. no shape kind appears exactly once: draw another scene
            continue
        examples.append(Example(scene, question_type, *qa))
    return examples


def example_stream(seed, weights=None, chunk=256, max_shapes=MAX_SHAPES):
    """An endless, reproducible stream of examples (chunks of `sample_examples` with derived seeds)."""
    index = 0
    while True:
        yield from sample_examples([seed, index], chunk, weights, max_shapes)
        index += 1


# ----------------------------------------------------------------------------------------------- vocabulary text

def all_question_answers():
    """Every (question, answer) pair the task can produce (descriptions: every sequence of 1..3 shapes), grouped
    by question in a fixed order: counting, colours, shapes, descriptions."""
    pairs = [(COUNT_QUESTION, count_answer(n)) for n in range(1, MAX_SHAPES + 1)]
    for kind in SHAPES:
        pairs += [(color_question(kind), color_answer(kind, color)) for color in COLOR_NAMES]
    for color in COLOR_NAMES:
        pairs += [(shape_question(color), shape_answer(color, kind)) for kind in SHAPES]
    objects = [(kind, color) for color in COLOR_NAMES for kind in SHAPES]
    for n in range(1, MAX_SHAPES + 1):
        for combo in np.ndindex(*([len(objects)] * n)):
            shapes = tuple(Shape(objects[i][0], objects[i][1], 0, 0, 0, (0, 0, 0)) for i in combo)
            pairs.append((DESCRIBE_QUESTION, describe(Scene(shapes, 0, 0.0, 0, 1))))
    return pairs


def all_texts():
    """The vocabulary's source text: the prompt template's words, then each question followed by its answers."""
    texts = ["USER: ASSISTANT:", COUNT_QUESTION, DESCRIBE_QUESTION]
    asked = set(texts)
    for question, answer in all_question_answers():
        if question not in asked:
            asked.add(question)
            texts.append(question)
        texts.append(answer)
    return texts


# ----------------------------------------------------------------------------------------------- demo

DEMO_SEED = 20240611


def demo_scene(seed=DEMO_SEED):
    """The bundled demo picture: the first scene from `seed` with three shapes of distinct kinds and colours,
    none in the smaller half of the size range, on a plain mid-grey 192-pixel canvas (made to be looked at;
    the processor scales it down)."""
    rng = np.random.default_rng(seed)
    mid_radius = sum(RADIUS_RANGE) / 2 / GRID
    while True:
        scene = random_scene(rng, num_shapes=3, size=192)
        if (len({s.kind for s in scene.shapes}) == 3 and len({s.color for s in scene.shapes}) == 3
                and min(s.radius for s in scene.shapes) >= mid_radius
                and scene.noise_std == 0.0 and 90 <= scene.background <= 200):
            return scene


def write_demo(image_path, spec_path, seed=DEMO_SEED):
    """Write the demo image and its spec (scene plus every question with its right answer)."""
    scene = demo_scene(seed)
    render(scene).save(image_path)
    spec = {"seed": seed, "scene": scene.to_dict(),
            "questions": [{"type": t, "question": q, "answer": a} for t, q, a in questions(scene)]}
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
        f.write("\n")
    return spec
