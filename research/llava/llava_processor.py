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

Prompt: ``USER: <image>\\n{question} ASSISTANT:`` (llava-1.5-hf chat template; one ``<image>\\n`` per
image); tokenized with BOS first; each ``<image>`` id is then repeated ``num_image_features`` (576)
times in place, the slots the projected image features fill.
"""
import io
import os
import urllib.error
import urllib.request

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

__all__ = ["load_image", "decode_image", "to_rgb", "expand_to_square", "LlavaImageProcessor", "build_prompt", "LlavaProcessor",
           "SUPPORTED_EXTENSIONS", "CLIP_MEAN", "CLIP_STD", "PAD_COLOR", "IMAGE_TOKEN"]

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = (122, 116, 104)  # int(255 * CLIP_MEAN), the original LLaVA's pad colour
IMAGE_TOKEN = "<image>"
IMAGE_TAG = IMAGE_TOKEN + "\n"  # what the template puts before the question, once per image
URL_TIMEOUT_SECONDS = 10.0


# ----------------------------------------------------------------------------------------------- images

def is_url(source):
    """True for an http(s) URL string."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


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
        grey = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.round(grey / 257.0).astype(np.uint8))
    return image.convert("RGB")


def _fetch_url(url, timeout):
    """The bytes at `url`; any HTTP or network failure becomes a ValueError naming the URL."""
    request = urllib.request.Request(url, headers={"User-Agent": "llava-ms"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        raise ValueError(f"could not download image {url!r}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:  # refused, DNS failure, timeout
        reason = getattr(err, "reason", err)
        raise ValueError(f"could not download image {url!r}: {reason}") from None


def decode_image(stream, name):
    """Decode an image file or byte stream fully (a truncated file fails here, not later in resizing); `name`
    (a path, a URL, "request image 2") is what an error message calls it.

    Returns:
        PIL.Image.Image, RGB, EXIF orientation applied.
    """
    try:
        with Image.open(stream) as image:
            image.load()
            # exif_transpose returns a new image, so the result outlives the closed file.
            return to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {name!r}: not a readable image file ({err})") from None


def load_image(source, timeout=URL_TIMEOUT_SECONDS):
    """Load an image from a local path or an http(s) URL as RGB.

    Args:
        source: str / os.PathLike path, http(s) URL, or a PIL image (converted to RGB only).
        timeout: seconds to wait for a URL.

    Returns:
        PIL.Image.Image in mode "RGB".

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported file extension, an unreadable/corrupt image, or a failed download.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if is_url(source):
        return decode_image(io.BytesIO(_fetch_url(source, timeout)), source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an image must be a PIL image, a path or an http(s) URL, got {type(source).__name__}")
    path = os.fspath(source)
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
        self.image_size = int(image_size)
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
        self.num_image_features = int(num_image_features)
        self.max_length = int(max_length)

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
        text = build_prompt(prompt, num_images)
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
