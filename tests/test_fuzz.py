"""Property-based fuzzing (hypothesis) of what takes outside input: the image processor (sizes, modes, aspect
ratios, declared sizes far past the limits, truncated and corrupted files), prompts through the tokenizer (any
unicode, control characters, `<image>` anywhere), the `--options` parser and the `.ckpt` reader (corrupted,
truncated and random files). Each input either works or is refused with a one-line ValueError (CheckpointError
for checkpoints); never another exception, a hang or a large allocation.

Derandomized and bounded (about a minute on two cores): the same examples on every run, so CI is stable; raise
FUZZ_EXAMPLES for a longer local search.
"""
import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import TINY
from llava_checkpoint import CheckpointError, CheckpointWriter, iter_checkpoint
from llava_processor import (IMAGE_TOKEN, MAX_ASPECT_RATIO, MAX_IMAGE_SIDE, LlavaImageProcessor, LlavaProcessor,
                             decode_image)
from llava_run_config import load_run_config
from llava_tokenizer import LlavaTokenizer

# pytest resets warning filters per test; llava_processor silences this one for the images it reads.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
YAML_TINY = os.path.join(TINY, "predict_llava_tiny.yaml")
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))


def fuzz(examples):
    return settings(max_examples=int(examples * SCALE), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def one_line(error):
    message = str(error)
    assert message and len(message.splitlines()) == 1, message
    return message


# ----------------------------------------------------------------------------------------------- images

MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"]
FORMATS = {"PNG": "RGB RGBA L LA P 1 I;16", "JPEG": "RGB L CMYK", "BMP": "RGB L P 1", "GIF": "L P",
           "TIFF": "RGB RGBA L LA P 1 I;16 I F CMYK", "WEBP": "RGB RGBA"}


def within_limits(width, height):
    return max(width, height) <= MAX_IMAGE_SIDE and max(width, height) <= MAX_ASPECT_RATIO * min(width, height)


def assert_refused_for_size(error, width, height):
    message = one_line(error)
    # Ours names the size; past 179 megapixels PIL refuses first, as it opens the file, and ours names the limit.
    assert f"is {width}x{height} pixels" in message or "at most 8000 pixels on a side" in message, message


image_sizes = st.tuples(st.integers(1, 400), st.integers(1, 400)) | st.tuples(st.integers(1, 3), st.integers(20, 90))


@fuzz(300)
@given(size=image_sizes, mode=st.sampled_from(MODES), image_format=st.sampled_from(sorted(FORMATS)),
       pad=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_images_of_any_size_mode_and_format(size, mode, image_format, pad, seed):
    if mode not in FORMATS[image_format].split():
        mode = FORMATS[image_format].split()[0]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    processor = LlavaImageProcessor(image_size=28, pad_to_square=pad)
    try:
        decoded = decode_image(io.BytesIO(buffer.getvalue()), "fuzz")
    except ValueError as error:
        assert not within_limits(*size)
        assert_refused_for_size(error, *size)
        return
    assert within_limits(*size) and decoded.mode == "RGB" and decoded.size == size
    out = processor([decoded])
    assert out.shape == (1, 3, 28, 28) and out.dtype == np.float32 and np.isfinite(out).all()


def png_declaring(width, height):
    """A PNG of a few dozen bytes whose header declares width x height (one row of real data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@fuzz(400)
@given(width=st.integers(1, 2 ** 31 - 1), height=st.integers(1, 2 ** 31 - 1))
def test_declared_sizes_are_checked_before_decoding(width, height):
    """Any declared size: refused by the limits (before a pixel is allocated) or decoded (here: refused as
    truncated, the data being one short row)."""
    try:
        image = decode_image(io.BytesIO(png_declaring(width, height)), "declared")
    except ValueError as error:
        if within_limits(width, height):
            assert "not a readable image file" in one_line(error)
        else:
            assert_refused_for_size(error, width, height)
        return
    assert image.size == (width, height) and width * height <= 64  # the data was enough


@pytest.fixture(scope="module")
def png_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@fuzz(400)
@given(cut=st.integers(0, 10 ** 6), flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(1, 255)),
                                                    max_size=8))
def test_truncated_and_corrupted_files(png_bytes, cut, flips):
    data = bytearray(png_bytes[:cut % (len(png_bytes) + 1)])
    for position, xor in flips:
        if data:
            data[position % len(data)] ^= xor
    try:
        image = decode_image(io.BytesIO(bytes(data)), "corrupt")
    except ValueError as error:
        one_line(error)
        return
    assert image.mode == "RGB" and within_limits(*image.size)


# ----------------------------------------------------------------------------------------------- prompts

@pytest.fixture(scope="module")
def tiny_processor():
    return LlavaProcessor(LlavaTokenizer(os.path.join(TINY, "tokenizer.model")), num_image_features=9,
                          max_length=128, image_size=48)


prompt_text = st.text(st.characters(codec="utf-8"), max_size=120)
with_tags = st.lists(prompt_text | st.just(IMAGE_TOKEN) | st.sampled_from(["USER:", " ASSISTANT:", "\n", "\x00",
                                                                         "\x1b[31m", "\u202e", "<s>", "</s>"]),
                     max_size=6).map("".join)


@fuzz(800)
@given(prompt=with_tags, num_images=st.integers(0, 2))
def test_any_prompt_is_encoded_or_refused_in_one_line(tiny_processor, prompt, num_images):
    tokenizer = tiny_processor.tokenizer
    try:
        ids = tiny_processor.encode_prompt(prompt, num_images)
    except ValueError as error:
        message = one_line(error)
        assert "tag(s) but" in message or "longer than the context" in message, message
        return
    assert 1 <= len(ids) <= 128 and all(0 <= token < len(tokenizer) for token in ids)
    assert ids.count(tokenizer.image_token_id) == 9 * num_images
    assert isinstance(tokenizer.decode(ids, skip_special_tokens=True), str)


# ----------------------------------------------------------------------------------------------- --options

KNOWN = ["model.model_config.max_new_tokens", "model.model_config.seq_length", "model.model_config.top_p",
         "model.model_config.vision_config.model_config.image_size", "processor.pad_to_square", "context.mode",
         "seed", "parallel_config.model_parallel", "processor.tokenizer.add_bos_token", "model.arch.type"]
keys = st.sampled_from(KNOWN) | st.text(st.sampled_from("abcdefgmoprstx._"), max_size=40) | \
    st.sampled_from(KNOWN).map(lambda key: key[:-1]) | st.sampled_from(KNOWN).map(lambda key: key + ".x")
values = st.sampled_from(["-1", "0", "1", "2.5", "true", "null", "abc", "[1, 2]", "{a: 1}", "1e309", "'x'", "[",
                          "", "!!python/object:os.system x", "&a [*a]"]) | st.text(max_size=20)


@fuzz(800)
@given(options=st.lists(st.tuples(keys, st.sampled_from(["=", ""]), values).map("".join), max_size=3))
def test_any_options_load_or_are_refused_in_one_line(options):
    try:
        load_run_config(YAML_TINY, options)
    except ValueError as error:
        one_line(error)


# ----------------------------------------------------------------------------------------------- .ckpt reader

@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.ckpt"
    with CheckpointWriter(str(path)) as writer:
        writer.write("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
        writer.write("b.bias", np.ones(5, np.float32), dtype="bfloat16")
        writer.write("c.ids", np.arange(3, dtype=np.int64))
    return path.read_bytes()


@fuzz(800)
@given(cut=st.integers(0, 10 ** 4), flips=st.lists(st.tuples(st.integers(0, 10 ** 4), st.integers(1, 255)),
                                                   max_size=6),
       junk=st.binary(max_size=64))
def test_ckpt_reader_refuses_corrupt_files_in_one_line(ckpt_bytes, tmp_path_factory, cut, flips, junk):
    data = bytearray(ckpt_bytes[:cut % (len(ckpt_bytes) + 1)])
    for position, xor in flips:
        if data:
            data[position % len(data)] ^= xor
    path = tmp_path_factory.getbasetemp() / "fuzz.ckpt"
    path.write_bytes(bytes(data) + junk)
    try:
        tensors = list(iter_checkpoint(str(path)))
    except CheckpointError as error:
        one_line(error)
        return
    for name, array in tensors:
        assert isinstance(name, str) and isinstance(array, np.ndarray)
