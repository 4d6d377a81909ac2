"""Inputs of LLaVA-1.5: image loading, CLIP image preprocessing, the prompt template and token ids.

Image preprocessing (as HF `CLIPImageProcessor` configured for llava-hf/llava-1.5-7b-hf), per image:

1. Convert to RGB with PIL's ``convert("RGB")`` (alpha is dropped, not composited; palette, CMYK, 1-bit
   and 8-bit grey expand as PIL does). One deliberate difference: 16-bit grey (``I;16*``) is scaled to
   8 bit (``round(v / 257)``) first; PIL, and so HF, would clip every value above 255 to white.
2. Optional, off by default (HF does not do it; the original LLaVA-1.5 code does): pad to a square
   canvas of side ``max(w, h)`` filled with ``pad_color`` (122, 116, 104) = ``int(mean * 255)``, the
   image pasted at ``((side - w) // 2, (side - h) // 2)``.
3. Resize with PIL bicubic (resample=3) on the uint8 image so the shortest edge is ``image_size``
   (336); the long edge becomes ``int(image_size * long / short)`` (truncated, not rounded).
4. Center crop ``image_size`` x ``image_size``: ``top = (h - S) // 2``, ``left = (w - S) // 2``.
5. Rescale ``x * (1/255)`` (computed in float64, stored float32), then ``(x - mean) / std`` in float32
   with CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711).
6. HWC -> CHW; images are stacked into ``float32 [N, 3, S, S]``.

Files and URLs are opened by `load_image`, which also applies the EXIF orientation (as HF's
``load_image`` does) so photos are seen upright; PIL images passed in are used as they are (as HF's
image processor does), only converted to RGB.

Limits (stated here once, in the README too). A few hundred bytes of PNG can declare a 1 x 100000 image, and
the steps above would then allocate gigabytes (the resize makes it 336 x 33.6 million pixels, the square
canvas 100000 x 100000), so the size is checked from the file's header before any pixel is decoded, and again
for PIL images passed in:

* ``MAX_IMAGE_SIDE`` (8000): the longer side, in pixels. It bounds the decoded image and the square canvas of
  step 2 alike to 64 megapixels (256 MB as PIL holds RGB).
* ``MAX_ASPECT_RATIO`` (20): long side / short side. It bounds the resize of step 3 to ``S`` x ``20 S``
  (336 x 6720); beyond it the center crop would keep less than 5% of the picture.
* Only the formats of ``SUPPORTED_EXTENSIONS`` are decoded, whatever a file or download calls itself (PIL's
  other plugins include ones that run external programs, such as EPS with Ghostscript).

URLs (http and https only) are fetched with a deadline for the whole download (``URL_TIMEOUT_SECONDS``,
connecting, redirects, headers and body: a server that sends a byte every few seconds is cut off at the
deadline, not kept alive by a per-read timeout), at most ``MAX_DOWNLOAD_BYTES`` (refused from the declared
length when there is one, else when the body passes it), and at most ``MAX_REDIRECTS`` redirects, each to an
http(s) URL on the standard port of its scheme or on the host and port that redirected (not to ``ftp:``,
``file:`` or another port, e.g. a service on the same machine).

Prompt: ``USER: <image>\\n{question} ASSISTANT:`` (llava-1.5-hf chat template; one ``<image>\\n`` per
image); tokenized with BOS first; each ``<image>`` id is then repeated ``num_image_features`` (576)
times in place, the slots the projected image features fill.
"""
import contextlib
import functools
import http.client
import io
import os
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from llava_config import check_value, is_int, is_number

__all__ = ["load_image", "decode_image", "check_image_size", "to_rgb", "expand_to_square", "LlavaImageProcessor",
           "build_prompt", "chat_prompt", "LlavaProcessor", "SUPPORTED_EXTENSIONS", "CLIP_MEAN", "CLIP_STD",
           "PAD_COLOR", "IMAGE_TOKEN", "MAX_IMAGE_SIDE", "MAX_ASPECT_RATIO", "URL_TIMEOUT_SECONDS",
           "MAX_DOWNLOAD_BYTES", "MAX_REDIRECTS"]

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# PIL's names of those formats: the only decoders Image.open may use (JPEG's also opens a phone's multi-picture
# JPEG, as MPO).
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = (122, 116, 104)  # int(255 * CLIP_MEAN), the original LLaVA's pad colour
IMAGE_TOKEN = "<image>"
IMAGE_TAG = IMAGE_TOKEN + "\n"  # what the template puts before the question, once per image

# PIL warns on stderr as it opens an image of 89 to 179 megapixels (and refuses larger ones); ours refuses everything
# past 64 megapixels, so for images read here the warning would only be a second, stray line.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# The limits of the module docstring.
MAX_IMAGE_SIDE = 8000
MAX_ASPECT_RATIO = 20
URL_TIMEOUT_SECONDS = 30.0
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
MAX_REDIRECTS = 5


# ----------------------------------------------------------------------------------------------- images

def is_url(source):
    """True for an http(s) URL string."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def check_image_size(width, height, name):
    """Raise ValueError naming `name` when a `width` x `height` image is beyond MAX_IMAGE_SIDE or
    MAX_ASPECT_RATIO (module docstring); called before its pixels are decoded or transformed."""
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"image {name!r} is {width}x{height} pixels; at most {MAX_IMAGE_SIDE} pixels on a side "
                         "are accepted: downscale it")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"image {name!r} is {width}x{height} pixels; an aspect ratio (long side / short side) of "
                         f"at most {MAX_ASPECT_RATIO} is accepted: crop it")


def to_rgb(image):
    """Any PIL image as an RGB image (see step 1 of the module docstring).

    Args:
        image: PIL.Image.Image of any mode (RGB, RGBA, L, LA, P, PA, CMYK, 1, I;16, I, F, ...).

    Returns:
        PIL.Image.Image in mode "RGB", same size (the input itself when it is already RGB).
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # round(v / 257) in integers: v / 257 is never exactly halfway (257 is odd), so this is exact, at half
        # the memory of float64.
        grey = np.asarray(image).astype(np.uint32)
        grey += 128
        grey //= 257
        image = Image.fromarray(grey.astype(np.uint8))
    return image.convert("RGB")


class _Deadline:
    """Ends a download when its time is up by shutting its connections down, which wakes a read blocked on
    them: a socket timeout bounds each read, not the download, so a server sending a byte every few seconds
    would otherwise hold it forever.

    Each connection is watched through a duplicate of its descriptor, which keeps naming the same connection
    after TLS takes the original socket object over (and cannot be reused for another one until closed here).
    """

    def __init__(self, seconds):
        self.expired = False
        self._sockets = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, connection_socket):
        duplicate = socket.socket(fileno=os.dup(connection_socket.fileno()))
        with self._lock:
            self._sockets.append(duplicate)
            if self.expired:
                self._shut(duplicate)

    def _expire(self):
        with self._lock:
            self.expired = True
            for duplicate in self._sockets:
                self._shut(duplicate)

    @staticmethod
    def _shut(duplicate):
        with contextlib.suppress(OSError):
            duplicate.shutdown(socket.SHUT_RDWR)

    def close(self):
        self._timer.cancel()
        with self._lock:
            for duplicate in self._sockets:
                duplicate.close()
            self._sockets = []


class _WatchedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection its `_Deadline` can end; connected as usual, then watched."""

    def __init__(self, *args, deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self):
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTPSConnection(http.client.HTTPSConnection, _WatchedHTTPConnection):
    """HTTPS: HTTPSConnection.connect calls the watched TCP connect (so the TLS handshake is watched too), then
    wraps the socket."""


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPConnection, deadline=self.deadline), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPSConnection, deadline=self.deadline), req,
                            context=ssl.create_default_context())


_DEFAULT_PORTS = {"http": 80, "https": 443}


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS redirects, each to http(s) on its standard port or on the host and port that
    redirected; anything else is refused (urllib alone follows ftp: and any port)."""

    max_redirections = MAX_REDIRECTS
    inf_msg = f"more than {MAX_REDIRECTS} redirects, or a redirect loop; the last was "

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target, source = urllib.parse.urlsplit(newurl), urllib.parse.urlsplit(req.full_url)
        if target.scheme not in _DEFAULT_PORTS:
            raise urllib.error.URLError(f"redirected to {newurl!r}: only http and https are followed")
        port = target.port or _DEFAULT_PORTS[target.scheme]
        same_place = (target.hostname, port) == (source.hostname, source.port or _DEFAULT_PORTS[source.scheme])
        if port != _DEFAULT_PORTS[target.scheme] and not same_place:
            raise urllib.error.URLError(f"redirected to {newurl!r}: a redirect may change the port only to "
                                        f"{target.scheme}'s standard port {_DEFAULT_PORTS[target.scheme]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_url(url, timeout):
    """The body at `url` within the limits of the module docstring (`timeout`: the whole download, seconds).

    Raises:
        ValueError naming the URL: an HTTP error, a network failure, the deadline, the byte cap or a redirect
        that is not followed.
    """
    deadline = _Deadline(timeout)
    opener = urllib.request.build_opener(_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline),
                                         _CheckedRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "llava-ms"})
    try:
        with opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_DOWNLOAD_BYTES:
                raise ValueError(f"could not download image {url!r}: it is {int(declared)} bytes, more than the "
                                 f"{MAX_DOWNLOAD_BYTES} an image may have")
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ValueError(f"could not download image {url!r}: it is more than the {MAX_DOWNLOAD_BYTES} "
                                     "bytes an image may have")
                chunks.append(chunk)
            if deadline.expired:  # the shut-down connection read as the end of the body
                raise TimeoutError
            if declared.isdigit() and size < int(declared):
                raise ValueError(f"could not download image {url!r}: the connection closed after {size} of "
                                 f"{declared} bytes")
            return b"".join(chunks)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        if deadline.expired:
            raise ValueError(f"could not download image {url!r}: no complete answer within {timeout:g} s") from None
        if isinstance(err, urllib.error.HTTPError):
            reason = f"HTTP {err.code} {str(err.reason).splitlines()[0]}"
        else:  # refused, DNS failure, a redirect not followed, a connection cut short
            reason = str(getattr(err, "reason", None) or err or type(err).__name__).splitlines()[0]
        raise ValueError(f"could not download image {url!r}: {reason}") from None
    finally:
        deadline.close()


def decode_image(stream, name):
    """Decode an image file or byte stream fully (a truncated file fails here, not later in resizing); `name`
    (a path, a URL, "request image 2") is what an error message calls it. Only SUPPORTED_FORMATS are decoded,
    and the size is checked (check_image_size) from the header, before the pixels are.

    Returns:
        PIL.Image.Image, RGB, EXIF orientation applied.

    Raises:
        ValueError naming `name`: not an image of a supported format, corrupt or truncated, or too large.
    """
    unreadable = (Image.DecompressionBombError, OSError, SyntaxError, EOFError, ValueError)  # what PIL raises
    try:
        image = Image.open(stream, formats=SUPPORTED_FORMATS)  # reads the header only
    except UnidentifiedImageError:  # its message shows the stream object, not the name
        raise ValueError(f"cannot read image {name!r}: not an image file of a supported format "
                         f"({', '.join(SUPPORTED_EXTENSIONS)})") from None
    except Image.DecompressionBombError as err:  # PIL's own limit, far above ours, checked as it opens
        raise ValueError(f"image {name!r} is too large ({err}); at most {MAX_IMAGE_SIDE} pixels on a side are "
                         "accepted: downscale it") from None
    except unreadable as err:
        raise _unreadable(name, err) from None
    with image:
        check_image_size(*image.size, name)
        try:
            image.load()
            # exif_transpose returns a new image, so the result outlives the closed file.
            return to_rgb(ImageOps.exif_transpose(image))
        except unreadable as err:
            raise _unreadable(name, err) from None


def _unreadable(name, error):
    return ValueError(f"cannot read image {name!r}: not a readable image file ({error})")


def load_image(source, timeout=URL_TIMEOUT_SECONDS):
    """Load an image from a local path or an http(s) URL as RGB, within the limits of the module docstring.

    Args:
        source: str / os.PathLike path, http(s) URL, or a PIL image (size-checked and converted to RGB only).
        timeout: seconds the whole download of a URL may take.

    Returns:
        PIL.Image.Image in mode "RGB".

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a directory, an unsupported file extension, an unreadable/corrupt or too large image, or a
            failed download.
    """
    if isinstance(source, Image.Image):
        check_image_size(*source.size, "PIL image")
        return to_rgb(source)
    if is_url(source):
        return decode_image(io.BytesIO(_fetch_url(source, timeout)), source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an image must be a PIL image, a path or an http(s) URL, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        raise ValueError(f"image file {path!r} is a directory; give an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"image file {path!r} has an unsupported extension {extension or '(none)'!r}; "
                         f"supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    return decode_image(path, path)


def expand_to_square(image, pad_color=PAD_COLOR):
    """Centre an RGB image on a square canvas of `pad_color` with side max(w, h) (original LLaVA).

    Returns:
        PIL.Image.Image, RGB, size (side, side); the input itself when it is already square.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(pad_color))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_edge(image, size, resample=Image.BICUBIC):
    """Resize so the shorter side is `size`; the longer becomes int(size * long / short) (HF's rule)."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, resample=resample)


def center_crop(pixels, size):
    """Centre `size` x `size` window of an HWC array whose sides are both >= size."""
    height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top:top + size, left:left + size]


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class LlavaImageProcessor:
    """CLIP preprocessing of LLaVA-1.5 (steps in the module docstring).

    Args:
        image_size (int): output side S (336 for ViT-L/14-336).
        mean, std (sequence of 3 floats): per-channel normalization of the [0, 1] pixels.
        pad_to_square (bool): pad to a square of `pad_color` before resizing (original LLaVA).
        pad_color (tuple of 3 ints): the padding colour, 0..255.
    """

    def __init__(self, image_size=336, mean=CLIP_MEAN, std=CLIP_STD, pad_to_square=False, pad_color=PAD_COLOR):
        def three(valid):
            return lambda v: isinstance(v, (list, tuple, np.ndarray)) and len(v) == 3 and all(map(valid, v))

        check_value("image processor image_size", image_size, lambda v: is_int(v) and v >= 1, "an integer >= 1")
        check_value("image processor mean", mean, three(is_number), "3 numbers")
        check_value("image processor std", std, three(lambda v: is_number(v) and v > 0), "3 numbers > 0")
        check_value("image processor pad_to_square", pad_to_square, lambda v: isinstance(v, bool), "true or false")
        check_value("image processor pad_color", pad_color, three(lambda v: is_int(v) and 0 <= v <= 255),
                    "3 integers in 0..255")
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.pad_to_square = pad_to_square
        self.pad_color = tuple(int(c) for c in pad_color)

    def __call__(self, images):
        """Preprocess images.

        Args:
            images: one image or a list of them; each a PIL image, a path or an http(s) URL.

        Returns:
            np.ndarray float32 [N, 3, image_size, image_size].
        """
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        arrays = [self.preprocess(load_image(image)) for image in images]
        if not arrays:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        return np.stack(arrays)

    def preprocess(self, image):
        """One RGB PIL image -> float32 [3, S, S]."""
        if self.pad_to_square:
            image = expand_to_square(image, self.pad_color)
        image = resize_shortest_edge(image, self.image_size)
        pixels = center_crop(np.asarray(image), self.image_size)
        # Same arithmetic as HF: x * (1/255) in float64 -> float32, then normalize in float32.
        scaled = (pixels.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
        normalized = (scaled - self.mean) / self.std
        return np.ascontiguousarray(normalized.transpose(2, 0, 1), dtype=np.float32)


# ----------------------------------------------------------------------------------------------- prompts

def is_conversation(text):
    """True when `text` is already a templated prompt: it has `<image>` or starts with `USER:`."""
    return IMAGE_TOKEN in text or text.lstrip().startswith("USER:")


def build_prompt(question, num_images=1):
    """The llava-1.5 single-turn prompt for `question` with `num_images` image tags.

    A text that already contains `<image>` or starts with `USER:` is returned unchanged (it is a
    conversation written out by the caller; wrapping it again would nest the template).

    Returns:
        str, e.g. "USER: <image>\\nWhat is shown? ASSISTANT:"; num_images=0 -> "USER: {question} ASSISTANT:".
    """
    if is_conversation(question):
        return question
    return f"USER: {IMAGE_TAG * num_images}{question} ASSISTANT:"


def chat_prompt(messages):
    """A conversation in llava-1.5-hf's chat template (its `chat_template.json`, as transformers'
    `apply_chat_template(messages, add_generation_prompt=True)` renders it).

    Args:
        messages: [{"role": "system" | "user" | "assistant", "content": [{"type": "image"} |
            {"type": "text", "text": str}, ...]}, ...].

    Returns:
        str. Each message is "ROLE: " (nothing for a system message), then "<image>\n" per image part, then
        each text part followed by a space; "ASSISTANT:" ends the prompt. So one question about one image is
        `build_prompt`'s "USER: <image>\nQ ASSISTANT:", and a follow-up "USER: <image>\nQ1 ASSISTANT: A1
        USER: Q2 ASSISTANT:" (the template puts no "</s>" after an answer, unlike the original LLaVA repo's).
    """
    parts = []
    for message in messages:
        if message["role"] != "system":
            parts.append(message["role"].upper() + ": ")
        parts.extend(IMAGE_TAG for part in message["content"] if part["type"] == "image")
        parts.extend(part["text"] + " " for part in message["content"] if part["type"] == "text")
    return "".join(parts) + "ASSISTANT:"


def expand_image_tokens(input_ids, image_token_id, count):
    """Repeat every `image_token_id` in `input_ids` `count` times in place (list of int -> list of int)."""
    expanded = []
    for token_id in input_ids:
        if token_id == image_token_id:
            expanded.extend([token_id] * count)
        else:
            expanded.append(token_id)
    return expanded


def _images_of(entry):
    """The images given for one prompt: None -> [], one image -> [it], a list/tuple -> list."""
    if entry is None:
        return []
    if isinstance(entry, (list, tuple)):
        return list(entry)
    return [entry]


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class LlavaProcessor:
    """Prompts and images -> token ids with expanded image slots and pixel values.

    Args:
        tokenizer: LlavaTokenizer (callable returning `input_ids`, with `image_token_id`).
        image_processor: LlavaImageProcessor; default one built from `image_size` and `pad_to_square`.
        num_image_features (int): image features per image (576 = (336/14)^2 for ViT-L/14-336).
        max_length (int): the context length (the model's `seq_length`); longer prompts are refused.
        image_size (int), pad_to_square (bool), image_mean, image_std (3 floats each): for the default image
            processor (an HF folder's preprocessor_config.json names the last two).
    """

    def __init__(self, tokenizer, image_processor=None, num_image_features=576, max_length=2048, image_size=336,
                 pad_to_square=False, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or LlavaImageProcessor(image_size=image_size, mean=image_mean,
                                                                      std=image_std, pad_to_square=pad_to_square)
        for name, value in (("num_image_features", num_image_features), ("max_length", max_length)):
            check_value(f"processor {name}", value, lambda v: is_int(v) and v >= 1, "an integer >= 1")
        self.num_image_features = num_image_features
        self.max_length = max_length

    def __call__(self, prompts, images=None):
        """Encode a batch.

        Args:
            prompts: str or list of str; templated prompts, or raw questions (templated with `build_prompt`).
            images: for a list of prompts, None or a list of the same length whose entries are None
                (text-only), one image (PIL image, path or URL) or a list of images for that prompt;
                for a single prompt, that entry itself.

        Returns:
            dict: "input_ids": list (one per prompt) of lists of int, ragged, BOS first, each `<image>`
            repeated `num_image_features` times; "pixel_values": np.float32 [total images, 3, S, S] in
            prompt order, or None when no prompt has an image.

        Raises:
            ValueError: a prompt's `<image>` count differs from its number of images, or it is longer
            than `max_length` tokens.
        """
        if isinstance(prompts, str):
            prompts, images = [prompts], [images]
        prompts = list(prompts)
        if images is None:
            images = [None] * len(prompts)
        elif not isinstance(images, (list, tuple)):
            raise TypeError("with a list of prompts, images must be None or a list with one entry per prompt, "
                            f"got {type(images).__name__}")
        images = list(images)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image entries; give one entry "
                             "(None, an image or a list of images) per prompt")
        input_ids, all_images = [], []
        for index, (prompt, entry) in enumerate(zip(prompts, images)):
            prompt_images = _images_of(entry)
            input_ids.append(self.encode_prompt(prompt, len(prompt_images), index))
            all_images.extend(prompt_images)
        pixel_values = self.image_processor(all_images) if all_images else None
        return {"input_ids": input_ids, "pixel_values": pixel_values}

    def encode_prompt(self, prompt, num_images, index=0):
        """Template (if raw), tokenize, check the image tags, expand them and check the length.

        Returns:
            list of int.
        """
        return self.encode_templated(build_prompt(prompt, num_images), num_images, index)

    def encode_templated(self, text, num_images, index=0):
        """`encode_prompt` for a prompt already in the template (e.g. `chat_prompt`'s), used as given."""
        ids = list(self.tokenizer(text)["input_ids"])
        image_token_id = self.tokenizer.image_token_id
        num_tags = ids.count(image_token_id)
        if num_tags != num_images:
            raise ValueError(f"prompt {index} has {num_tags} {IMAGE_TOKEN} tag(s) but {num_images} image(s) were "
                             f"given for it: {text[:80]!r}")
        ids = expand_image_tokens(ids, image_token_id, self.num_image_features)
        if len(ids) > self.max_length:
            raise ValueError(f"prompt {index} is {len(ids)} tokens long ({num_images} image(s) x "
                             f"{self.num_image_features} image tokens included), longer than the context "
                             f"seq_length {self.max_length}")
        return ids
