"""Image loading, LlavaImageProcessor against HF CLIPImageProcessor, prompts, and LlavaProcessor against
HF LlavaProcessor (configured as llava-hf/llava-1.5-7b-hf)."""
import functools
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image, features

# The plugin (MindSpore) must be imported before transformers touches protobuf.
from conftest import PLUGIN
from llava_processor import (CLIP_MEAN, CLIP_STD, MAX_ASPECT_RATIO, MAX_DOWNLOAD_BYTES, MAX_IMAGE_SIDE,
                             MAX_REDIRECTS, PAD_COLOR, SUPPORTED_EXTENSIONS, LlavaImageProcessor, LlavaProcessor,
                             build_prompt, load_image)
from llava_tokenizer import LlavaTokenizer
from mindformers.models.build_processor import build_processor
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from test_tokenizer import VOCAB, llava_hf_tokenizer

import transformers

IMAGE_ID = 32000
SIZES = [(336, 336), (640, 480), (480, 640), (1000, 250), (250, 1000), (337, 335), (335, 337), (101, 57),
         (7, 3), (1, 1), (5, 100)]  # 5x100: the largest aspect ratio accepted (MAX_ASPECT_RATIO)
MODES = ["RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "1", "I", "F", "YCbCr"]


def noise(width, height, seed=0):
    """Random uint8 RGB image."""
    rng = np.random.default_rng(seed + 7919 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def gradient(width, height):
    """Smooth RGB image: horizontal red ramp, vertical green ramp, diagonal blue."""
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    channels = [np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), (x + y) / 2]
    return Image.fromarray(np.stack(channels, axis=-1).round().astype(np.uint8))


def hf_clip(image_size=336):
    """HF CLIPImageProcessor with llava-1.5-7b-hf's preprocessor_config."""
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, resample=3,
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def hf_pixels(images, image_size=336):
    # channels_last stated: HF guesses the layout wrongly for tiny images such as 1x1 or 7x3.
    return hf_clip(image_size)(images, return_tensors="np", input_data_format="channels_last")["pixel_values"]


def normalized_pad_color():
    return (np.asarray(PAD_COLOR, np.float32) / 255 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD,
                                                                                                      np.float32)


# ----------------------------------------------------------------------------------------------- image processor

@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_matches_hf_clip_for_sizes(size):
    images = [noise(*size), gradient(*size)]
    ours = LlavaImageProcessor()(images)
    assert ours.dtype == np.float32 and ours.shape == (2, 3, 336, 336)
    np.testing.assert_allclose(ours, hf_pixels(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_matches_hf_clip_for_modes(mode):
    images = [noise(333, 517).convert(mode), gradient(517, 333).convert(mode)]
    ours = LlavaImageProcessor()(images)
    np.testing.assert_allclose(ours, hf_pixels(images), rtol=0, atol=1e-5)


def test_smaller_image_size_matches_hf():
    image = noise(90, 60)
    ours = LlavaImageProcessor(image_size=28)([image])
    assert ours.shape == (1, 3, 28, 28)
    np.testing.assert_allclose(ours, hf_pixels([image], image_size=28), rtol=0, atol=1e-5)


def test_16_bit_grey_is_scaled_not_clipped():
    """PIL (and so HF) clips 16-bit values above 255 to white; ours scales them to 8 bit first."""
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    image16 = Image.fromarray(ramp)
    assert image16.mode == "I;16"
    as_8_bit = Image.fromarray(np.round(ramp / 257.0).astype(np.uint8)).convert("RGB")
    np.testing.assert_allclose(LlavaImageProcessor()([image16]), hf_pixels([as_8_bit]), rtol=0, atol=1e-5)
    assert np.asarray(load_image(image16)).mean() == pytest.approx(np.asarray(as_8_bit).mean())


def test_paths_and_pil_images_give_the_same_pixels(tmp_path):
    path = tmp_path / "noise.png"
    noise(300, 200).save(path)
    processor = LlavaImageProcessor()
    from_path = processor([str(path)])
    np.testing.assert_array_equal(from_path, processor([noise(300, 200)]))
    np.testing.assert_array_equal(processor(str(path)), from_path)  # a single image is a batch of one
    assert processor([]).shape == (0, 3, 336, 336)


def test_pad_to_square_landscape_and_portrait():
    pad = normalized_pad_color()
    padded = LlavaImageProcessor(pad_to_square=True)
    # 672x336 -> canvas 672x672 with 168 pad rows above and below -> 84 rows each at 336.
    landscape = padded([noise(672, 336)])[0]
    # Rows away from the seam are exactly the pad colour (bicubic of a constant is that constant).
    np.testing.assert_allclose(landscape[:, :80, :], np.broadcast_to(pad[:, None, None], (3, 80, 336)), atol=1e-6)
    np.testing.assert_allclose(landscape[:, -80:, :], np.broadcast_to(pad[:, None, None], (3, 80, 336)), atol=1e-6)
    assert np.abs(landscape[:, 100:236, :] - pad[:, None, None]).max() > 0.5  # the noise is still there
    portrait = padded([noise(200, 400)])[0]  # 100 pad columns each side of 400 -> 84 at 336
    np.testing.assert_allclose(portrait[:, :, :80], np.broadcast_to(pad[:, None, None], (3, 336, 80)), atol=1e-6)
    np.testing.assert_allclose(portrait[:, :, -80:], np.broadcast_to(pad[:, None, None], (3, 336, 80)), atol=1e-6)


def test_pad_to_square_equals_hf_on_an_independently_padded_image():
    for width, height in [(500, 301), (301, 500), (9, 4)]:
        image = gradient(width, height)
        side = max(width, height)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = PAD_COLOR
        top, left = (side - height) // 2, (side - width) // 2
        canvas[top:top + height, left:left + width] = np.asarray(image)
        ours = LlavaImageProcessor(pad_to_square=True)([image])
        np.testing.assert_allclose(ours, hf_pixels([Image.fromarray(canvas)]), rtol=0, atol=1e-5)


def test_pad_to_square_leaves_square_images_unchanged():
    image = noise(400, 400)
    np.testing.assert_array_equal(LlavaImageProcessor(pad_to_square=True)([image]),
                                  LlavaImageProcessor()([image]))


# ----------------------------------------------------------------------------------------------- load_image

def pillow_can_save(extension):
    return extension != ".webp" or features.check("webp")


@pytest.mark.parametrize("extension", SUPPORTED_EXTENSIONS)
def test_load_every_supported_extension(tmp_path, extension):
    if not pillow_can_save(extension):
        pytest.skip("Pillow built without WebP")
    image = gradient(40, 30)
    path = tmp_path / f"image{extension.upper() if extension == '.png' else extension}"
    options = {"lossless": True} if extension == ".webp" else {}
    image.save(path, **options)
    loaded = load_image(str(path))
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if extension not in (".jpg", ".jpeg", ".gif"):  # lossy or palette formats change pixels
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


@pytest.mark.parametrize("mode,extension", [("L", ".png"), ("LA", ".png"), ("P", ".png"), ("RGBA", ".png"),
                                            ("1", ".bmp"), ("CMYK", ".jpg"), ("CMYK", ".tiff"), ("P", ".gif"),
                                            ("I;16", ".png"), ("I", ".tif"), ("F", ".tiff")])
def test_load_converts_any_mode_to_rgb(tmp_path, mode, extension):
    source = gradient(32, 24)
    image = Image.fromarray(np.asarray(source.convert("L")).astype(np.uint16) * 257) if mode == "I;16" \
        else source.convert(mode)
    path = tmp_path / f"image{extension}"
    image.save(path)
    assert Image.open(path).mode == mode
    loaded = load_image(path)  # os.PathLike accepted
    assert loaded.mode == "RGB" and loaded.size == (32, 24)
    if mode in ("L", "I;16"):
        np.testing.assert_array_equal(np.asarray(loaded)[..., 0], np.asarray(source.convert("L")))


def test_load_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    gradient(60, 20).save(path, exif=exif)
    assert load_image(str(path)).size == (20, 60)


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "no_such_image.jpg"
    with pytest.raises(FileNotFoundError, match="no_such_image.jpg"):
        load_image(str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_image.jpg"):
        LlavaImageProcessor()([str(missing)])


def test_unsupported_extension_names_file_and_supported_list(tmp_path):
    path = tmp_path / "picture.svg"
    path.write_text("<svg/>")
    with pytest.raises(ValueError) as info:
        load_image(str(path))
    message = str(info.value)
    assert str(path) in message and "'.svg'" in message
    assert all(extension in message for extension in SUPPORTED_EXTENSIONS)


@pytest.mark.parametrize("name,content", [("garbage.png", b"definitely not an image" * 20),
                                          ("empty.jpg", b""),
                                          ("text.bmp", b"BM but not really a bitmap")])
def test_corrupt_image_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read image") as info:
        load_image(str(path))
    assert str(path) in str(info.value)


def test_truncated_image_names_the_file(tmp_path):
    path = tmp_path / "truncated.png"
    noise(200, 200).save(path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(str(path))


# ----------------------------------------------------------------------------------------------- URLs

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """A tiny HTTP server on 127.0.0.1 serving tmp_path; yields (directory, base URL)."""
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_load_image_from_url_equals_file(http_root):
    directory, base = http_root
    noise(123, 77).save(directory / "photo.png")
    from_url = load_image(f"{base}/photo.png")
    np.testing.assert_array_equal(np.asarray(from_url), np.asarray(load_image(str(directory / "photo.png"))))
    np.testing.assert_array_equal(LlavaImageProcessor()([f"{base}/photo.png"]),
                                  LlavaImageProcessor()([str(directory / "photo.png")]))


def test_url_404_names_the_url(http_root):
    _, base = http_root
    url = f"{base}/missing.jpg"
    with pytest.raises(ValueError, match="404") as info:
        load_image(url)
    assert url in str(info.value)


def test_url_that_is_not_an_image_names_the_url(http_root):
    directory, base = http_root
    (directory / "page.html").write_text("<html>hello</html>")
    with pytest.raises(ValueError, match="cannot read image") as info:
        load_image(f"{base}/page.html")
    assert f"{base}/page.html" in str(info.value)


def test_unreachable_url_names_the_url():
    with socket.socket() as probe:  # a port nothing listens on: bound then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/image.png"
    with pytest.raises(ValueError, match="could not download image") as info:
        load_image(url, timeout=2)
    assert url in str(info.value)


def test_url_that_is_not_an_image_does_not_show_the_stream(http_root):
    directory, base = http_root
    (directory / "page.html").write_text("<html>hello</html>")
    with pytest.raises(ValueError) as info:
        load_image(f"{base}/page.html")
    assert "BytesIO" not in str(info.value) and "not an image file of a supported format" in str(info.value)


DRIP_BYTES = 40  # finite, so a regression fails (after 8 s) instead of hanging


class _HostileHandler(http.server.BaseHTTPRequestHandler):
    """What a careless or hostile server does; the image at /image.png is a real one."""

    protocol_version = "HTTP/1.1"
    image = b""

    def log_message(self, *args):
        pass

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802 (http.server's name)
        try:
            self.answer()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def answer(self):
        path = self.path
        if path == "/image.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
        elif path == "/drip":  # a byte every 0.2 s: each read is quick, the whole takes 8 s
            self.send_response(200)
            self.send_header("Content-Length", str(DRIP_BYTES))
            self.end_headers()
            for _ in range(DRIP_BYTES):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(DRIP_BYTES):
                self.wfile.write(b"X-Slow: y\r\n")
                self.wfile.flush()
                time.sleep(0.2)
            self.close_connection = True
        elif path == "/huge-declared":  # then nothing: the client must not wait for the body
            self.send_response(200)
            self.send_header("Content-Length", str(10 ** 10))
            self.end_headers()
            self.close_connection = True
        elif path == "/huge-undeclared":  # no length: the body runs until the client stops reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            block = b"\0" * (1 << 20)
            for _ in range(MAX_DOWNLOAD_BYTES // len(block) + 10):
                self.wfile.write(block)
        elif path == "/to-ftp":
            self.redirect("ftp://127.0.0.1/image.png")
        elif path == "/to-file":
            self.redirect("file:///etc/passwd")
        elif path == "/to-other-port":
            self.redirect(f"http://127.0.0.1:{self.server.other_port}/image.png")
        elif path == "/loop":
            self.redirect("/loop")
        elif path.startswith("/hops/"):  # /hops/N: N + 1 redirects on the same host and port, then the image
            left = int(path.rsplit("/", 1)[1])
            self.redirect(f"/hops/{left - 1}" if left else "/image.png")
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def hostile_server():
    """A server on 127.0.0.1 with the handler above; yields its base URL."""
    with socket.socket() as probe:  # a port nothing listens on, for the redirect to another port
        probe.bind(("127.0.0.1", 0))
        other_port = probe.getsockname()[1]
    buffer = __import__("io").BytesIO()
    noise(40, 30).save(buffer, format="PNG")
    handler = type("Handler", (_HostileHandler,), {"image": buffer.getvalue()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.other_port = other_port
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def url_error(url, timeout=1.0):
    started = time.monotonic()
    with pytest.raises(ValueError, match="could not download image") as info:
        load_image(url, timeout=timeout)
    assert url in str(info.value) and len(str(info.value).splitlines()) == 1
    return str(info.value), time.monotonic() - started


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_url_deadline_covers_the_whole_download(hostile_server, path):
    """A byte every 0.2 s never trips a per-read timeout; the deadline ends the download all the same."""
    message, seconds = url_error(hostile_server + path, timeout=1.0)
    assert "no complete answer within 1 s" in message
    assert seconds < 2.5


def test_url_body_over_the_byte_cap(hostile_server):
    message, seconds = url_error(hostile_server + "/huge-declared")
    assert f"10000000000 bytes, more than the {MAX_DOWNLOAD_BYTES}" in message and seconds < 1
    message, _ = url_error(hostile_server + "/huge-undeclared", timeout=20)
    assert f"more than the {MAX_DOWNLOAD_BYTES} bytes" in message


@pytest.mark.parametrize("path,reason", [
    ("/to-ftp", "only http and https are followed"),
    ("/to-file", "Redirection to url 'file:///etc/passwd' is not allowed"),  # urllib's own refusal
    ("/to-other-port", "may change the port only to http's standard port 80"),
    ("/loop", f"more than {MAX_REDIRECTS} redirects, or a redirect loop"),
    (f"/hops/{MAX_REDIRECTS}", f"more than {MAX_REDIRECTS} redirects"),
])
def test_url_redirects_refused(hostile_server, path, reason):
    assert reason in url_error(hostile_server + path)[0]


def test_url_redirects_on_the_same_server_are_followed(hostile_server):
    image = load_image(f"{hostile_server}/hops/{MAX_REDIRECTS - 1}")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(noise(40, 30)))


@pytest.mark.parametrize("arguments,message", [
    ({"pad_to_square": "False"}, "pad_to_square must be true or false, got 'False'"),  # a string is truthy
    ({"image_size": "336"}, "image_size must be an integer >= 1"),
    ({"std": (0.2, 0, 0.3)}, "std must be 3 numbers > 0"),
    ({"mean": 0.5}, "mean must be 3 numbers"),
    ({"pad_color": (300, 0, 0)}, "pad_color must be 3 integers in 0..255"),
])
def test_image_processor_settings_are_checked(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LlavaImageProcessor(**arguments)


# ----------------------------------------------------------------------------------------------- image limits

def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_image(str(tmp_path))


def test_only_supported_formats_are_decoded(tmp_path):
    """An EPS file named .png is not handed to PIL's EPS plugin (which runs Ghostscript)."""
    path = tmp_path / "vector.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ValueError, match="not an image file of a supported format"):
        load_image(str(path))


@pytest.mark.parametrize("size", [(MAX_IMAGE_SIDE, 400), (400, MAX_IMAGE_SIDE), (1, MAX_ASPECT_RATIO),
                                  (MAX_ASPECT_RATIO * 3, 3)])
def test_images_at_the_limits_are_accepted(tmp_path, size):
    path = tmp_path / "edge.png"
    Image.new("L", size).save(path)
    assert load_image(str(path)).size == size
    assert LlavaImageProcessor(image_size=28, pad_to_square=True)([str(path)]).shape == (1, 3, 28, 28)


# Each a file of a few hundred bytes to a few kB (or a PIL image of that file) whose preprocessing would take gigabytes:
# 1 x 100000 (resized to 336 x 33.6 million), 1 x 5000 at 336 (6 GB measured before the limits), 1 x 20000
# with pad_to_square (a 20000 x 20000 canvas), and a side over the limit.
BOMBS = [(1, 100000, False), (1, 5000, False), (20000, 1, True), (MAX_IMAGE_SIDE + 1, 500, True)]
BOMB_SCRIPT = """
import resource, sys
sys.path.insert(0, {plugin!r})
from PIL import Image
from llava_processor import LlavaImageProcessor
# Room for the small images of this test only: a regression fails here instead of swapping the machine.
with open("/proc/self/status") as status:
    virtual = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (virtual + (512 << 20), resource.RLIM_INFINITY))
for path, pad in {cases!r}:
    for image in (path, Image.open(path)):
        try:
            LlavaImageProcessor(image_size=336, pad_to_square=pad)([image])
            print("RESULT accepted", path)
        except ValueError as error:
            print("RESULT", error)
"""


def test_tiny_files_with_huge_preprocessing_are_refused_before_allocating(tmp_path):
    cases = []
    for index, (width, height, pad) in enumerate(BOMBS):
        path = str(tmp_path / f"bomb{index}.png")
        Image.new("L", (width, height)).save(path)
        assert os.path.getsize(path) < 5000
        cases.append((path, pad))
    result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT.format(plugin=PLUGIN, cases=cases)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 2 * len(BOMBS), result.stdout
    for (width, height, _), file_line, pil_line in zip(BOMBS, lines[::2], lines[1::2]):
        limit = f"at most {MAX_IMAGE_SIDE} pixels on a side" if max(width, height) > MAX_IMAGE_SIDE else \
            f"aspect ratio (long side / short side) of at most {MAX_ASPECT_RATIO}"
        assert f"is {width}x{height} pixels" in file_line and limit in file_line, file_line
        assert f"is {width}x{height} pixels" in pil_line and limit in pil_line, pil_line


# ----------------------------------------------------------------------------------------------- prompts

def test_build_prompt():
    assert build_prompt("What is shown in this image?") == "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    assert build_prompt("Compare them.", num_images=2) == "USER: <image>\n<image>\nCompare them. ASSISTANT:"
    assert build_prompt("Tell me a joke.", num_images=0) == "USER: Tell me a joke. ASSISTANT:"
    conversation = "USER: <image>\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:"
    assert build_prompt(conversation) == conversation
    assert build_prompt("USER: hi ASSISTANT:") == "USER: hi ASSISTANT:"
    assert build_prompt("<image>\nDescribe.") == "<image>\nDescribe."


# ----------------------------------------------------------------------------------------------- LlavaProcessor

@pytest.fixture(scope="module")
def tokenizer():
    return LlavaTokenizer(VOCAB)


@pytest.fixture(scope="module")
def hf_processor(tmp_path_factory):
    hf_tokenizer = llava_hf_tokenizer(str(tmp_path_factory.mktemp("hf_tokenizer")))
    processor = transformers.LlavaProcessor(image_processor=hf_clip(), tokenizer=hf_tokenizer, patch_size=14,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            image_token="<image>")
    # HF takes the id as encode("<image>")[0], which with the slow legacy=False tokenizer is the "▁" (29871)
    # in front of it; its own token-count check then fails. The expansion itself does not use the id.
    processor.image_token_id = IMAGE_ID
    return processor


@pytest.mark.parametrize("prompt,num_images", [
    ("USER: <image>\nWhat is shown in this image? ASSISTANT:", 1),
    ("USER: <image>\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:", 1),
    ("USER: <image>\n<image>\n两张图片有什么不同？ ASSISTANT:", 2),
    ("<image>\nDescribe  this.", 1),
])
def test_matches_hf_llava_processor(tokenizer, hf_processor, prompt, num_images):
    images = [noise(500, 375, seed=index) for index in range(num_images)]
    expected = hf_processor(images=images, text=[prompt], return_tensors="np")
    ours = LlavaProcessor(tokenizer)([prompt], [images])
    assert ours["input_ids"] == [expected["input_ids"][0].tolist()]
    assert ours["input_ids"][0].count(IMAGE_ID) == 576 * num_images
    np.testing.assert_allclose(ours["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-5)


def test_mixed_batch(tokenizer, tmp_path):
    path = tmp_path / "b.jpg"
    noise(320, 480, seed=2).save(path)
    image_a = gradient(640, 480)
    prompts = ["USER: <image>\nWhat is this? ASSISTANT:", "Tell me a joke.", "What colour is it?"]
    out = LlavaProcessor(tokenizer)(prompts, [image_a, None, str(path)])
    ids = out["input_ids"]
    assert [row[0] for row in ids] == [1, 1, 1]
    assert [row.count(IMAGE_ID) for row in ids] == [576, 0, 576]
    assert ids[1] == tokenizer("USER: Tell me a joke. ASSISTANT:")["input_ids"]  # raw text-only: templated
    expanded = tokenizer("USER: <image>\nWhat colour is it? ASSISTANT:")["input_ids"]
    at = expanded.index(IMAGE_ID)
    assert ids[2] == expanded[:at] + [IMAGE_ID] * 576 + expanded[at + 1:]  # raw question + image: templated
    assert out["pixel_values"].shape == (2, 3, 336, 336) and out["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(out["pixel_values"], LlavaImageProcessor()([image_a, str(path)]))


def test_text_only_batch_has_no_pixel_values(tokenizer):
    out = LlavaProcessor(tokenizer)(["USER: hi ASSISTANT:", "hello"])
    assert out["pixel_values"] is None
    assert out["input_ids"][0] == out["input_ids"][1][:1] + tokenizer.encode("USER: hi ASSISTANT:")[1:]


def test_single_prompt_and_pad_to_square(tokenizer):
    image = noise(400, 200)
    out = LlavaProcessor(tokenizer, pad_to_square=True)("Describe it.", image)
    assert len(out["input_ids"]) == 1 and out["input_ids"][0].count(IMAGE_ID) == 576
    np.testing.assert_array_equal(out["pixel_values"], LlavaImageProcessor(pad_to_square=True)([image]))


def test_num_image_features_is_used(tokenizer):
    out = LlavaProcessor(tokenizer, num_image_features=4, image_size=28)(["Hi"], [noise(50, 50)])
    assert out["input_ids"][0].count(IMAGE_ID) == 4 and out["pixel_values"].shape == (1, 3, 28, 28)


@pytest.mark.parametrize("prompt,images,tags,given", [
    ("USER: <image>\nWhat is it? ASSISTANT:", None, 1, 0),
    ("USER: <image>\n<image>\nCompare. ASSISTANT:", "one", 2, 1),
    ("USER: What is it? ASSISTANT:", "one", 0, 1),
    ("USER: <image>\nWhat is it? ASSISTANT:", "two", 1, 2),
])
def test_image_tag_count_mismatch(tokenizer, prompt, images, tags, given):
    entry = {None: None, "one": noise(10, 10), "two": [noise(10, 10), noise(12, 12)]}[images]
    with pytest.raises(ValueError, match=f"has {tags} <image> tag\\(s\\) but {given} image\\(s\\)"):
        LlavaProcessor(tokenizer)([prompt], [entry])


def test_prompt_longer_than_context(tokenizer):
    prompt = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    length = len(tokenizer(prompt)["input_ids"]) - 1 + 576  # 18 text tokens + 576 image tokens
    assert len(LlavaProcessor(tokenizer, max_length=length)([prompt], [noise(8, 8)])["input_ids"][0]) == length
    with pytest.raises(ValueError, match="seq_length") as info:
        LlavaProcessor(tokenizer, max_length=length - 1)([prompt], [noise(8, 8)])
    assert f"is {length} tokens long" in str(info.value) and f"seq_length {length - 1}" in str(info.value)


def test_prompt_and_image_counts_must_agree(tokenizer):
    with pytest.raises(ValueError, match="2 prompts but 1 image entries"):
        LlavaProcessor(tokenizer)(["a", "b"], [None])


def test_images_for_a_batch_must_be_a_list(tokenizer):
    with pytest.raises(TypeError, match="one entry per prompt"):
        LlavaProcessor(tokenizer)(["Describe."], noise(8, 8))


def test_built_from_yaml_config():
    assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, "LlavaProcessor") is LlavaProcessor
    processor = build_processor({"type": "LlavaProcessor", "max_length": 4096,
                                 "tokenizer": {"type": "LlavaTokenizer", "vocab_file": VOCAB,
                                               "add_bos_token": True, "add_eos_token": False},
                                 "image_processor": {"type": "LlavaImageProcessor", "image_size": 336}})
    assert isinstance(processor.tokenizer, LlavaTokenizer)
    assert isinstance(processor.image_processor, LlavaImageProcessor) and processor.max_length == 4096


def test_processor_sizes_are_checked(tokenizer):
    with pytest.raises(ValueError, match="processor max_length must be an integer >= 1, got 0"):
        LlavaProcessor(tokenizer, max_length=0)
    with pytest.raises(ValueError, match="processor num_image_features must be an integer >= 1, got '576'"):
        LlavaProcessor(tokenizer, num_image_features="576")
