"""Convert HuggingFace LLaVA-1.5 safetensors weights into a MindSpore `.ckpt` for llava-ms.

Usage::

    python convert_weight.py --model llava --input_path HF_DIR --output_path OUT.ckpt \
        [--dtype float16|bfloat16|float32] [--model_parallel N] [--verbose]

`HF_DIR` holds `model.safetensors`, or shards `model-*.safetensors` with or without
`model.safetensors.index.json` (a single `.safetensors` file may be given instead of a directory), and
normally `config.json`. All three spellings of the tensor names are accepted: the hub files
(`language_model.model.*`), transformers 4.5x `state_dict()` (`model.language_model.*`) and transformers v5
saves (`vision_tower.*` without `vision_model.`).

`--dtype` defaults to keeping each source tensor's dtype (the hub weights are float16, so they stay float16);
give it to cast every tensor.

Without `config.json` the sizes are inferred from the tensor shapes; what shapes cannot tell falls back to
LLaVA-1.5-7B: `vision_feature_layer=-2`, `image_token_id=32000`, attention heads from a head size of 64
(CLIP) and 128 (LLaMA). Head counts do not change the converted checkpoint; the feature layer does (it
decides which vision layers are stored).

`--model_parallel N` (N > 1) writes the per-rank checkpoints of N-way tensor parallelism instead of one
file: `--output_path` is then a directory and gets `rank_K/llava.ckpt` for K = 0 .. N-1 (the layout
`run_mindformer.py --load_checkpoint DIR` loads directly; which axis each tensor is split along is in
research/llava/llava_sharding.py). The input is still read once, each rank's slice of every tensor going
to its own file. N must divide every split dimension and (when config.json gives them) the head counts;
that is checked before anything is written.

Tensors LLaVA never uses are skipped on purpose: the vision `post_layernorm`, the vision layers after
`vision_feature_layer` (layer 24 of 24 for the 7B), and rotary `inv_freq` / `position_ids` buffers. Any
other name is an error, as are wrong shapes and missing tensors; all of it is checked from the safetensors
headers before anything is written.

The conversion streams: each tensor is read on its own with plain file reads, converted (transposed where
our layout needs it, see research/llava/llava_layout.py) and appended to the output straight from the array, so
memory holds at most two copies of the largest tensor on top of what importing MindSpore/mindformers costs
(the 7B figures are in bench/RESULTS.md). The output appears only when complete (temporary file + rename): after an error, Ctrl-C or
SIGTERM nothing new is left at the output path (an earlier file there is kept as it was).

A progress bar (tensors and bytes) goes to stderr when stderr is a terminal or with --verbose. Errors are
one line on stderr and a non-zero exit (1; 2 for usage errors; 130 when interrupted by Ctrl-C or SIGTERM);
on success one summary line goes to stderr. --verbose adds the config's source, the tensors deliberately
skipped, mindformers' import messages and tracebacks.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "research", "llava"))
from llava_checkpoint import CheckpointError, CheckpointWriter, check_complete, check_tensor  # noqa: E402
from llava_layout import (HF_TEXT_LAYER, checkpoint_layout, hf_vision_layer, our_name, shard,  # noqa: E402
                          split_hf_name, stored_from_hf, stored_shape_from_hf)
from llava_sharding import RANK_DIR, sharded_layout  # noqa: E402

logger = logging.getLogger("convert_weight")

# ---------------------------------------------------------------------------------------------------------
# A minimal safetensors reader.
#
# The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets)
# and the raw little-endian tensor bytes. Reading it by hand avoids torch (numpy cannot hold bfloat16, so
# safetensors' numpy loader refuses bf16 files) and lets each tensor be read with one plain `readinto`:
# unlike a memory map, the page cache it goes through is not counted in (or kept in) this process' memory.
# ---------------------------------------------------------------------------------------------------------

# safetensors dtype -> numpy dtype the raw bytes are read as (bfloat16 as its uint16 bit patterns).
_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a safetensors file: where its bytes are, not the bytes themselves."""

    name: str
    path: str
    dtype: str  # safetensors code: F32, F16 or BF16
    shape: tuple
    offset: int  # absolute position of the first byte in the file
    nbytes: int


def read_safetensors_header(path):
    """List the tensors of one safetensors file, checking the header against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_bytes <= min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(stream.read(header_bytes))
        except ValueError as error:
            raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from error
    data_start = 8 + header_bytes
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = entry.get("dtype"), tuple(entry.get("shape", ()))
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; only F32, F16 and BF16 are supported")
        begin, end = entry["data_offsets"]
        expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != expected or data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} {list(shape)} {dtype} does not fit its byte range "
                                  f"{begin}..{end}: the file is truncated or corrupt")
        tensors.append(SourceTensor(name, path, dtype, shape, data_start + begin, end - begin))
    return tensors


def read_tensor(stream, tensor):
    """Read one tensor from an open (unbuffered) file; bfloat16 comes back as float32 (exact)."""
    buffer = np.empty(tensor.nbytes, dtype=np.uint8)
    view, done = memoryview(buffer), 0
    stream.seek(tensor.offset)
    while done < tensor.nbytes:  # a single read() is capped at ~2 GB on Linux, so loop
        count = stream.readinto(view[done:])
        if not count:
            raise CheckpointError(f"{tensor.path}: tensor {tensor.name!r} ends early: the file is truncated")
        done += count
    _drop_from_page_cache(stream, tensor)
    array = buffer.view(_SAFETENSORS_DTYPES[tensor.dtype]).reshape(tensor.shape)
    if tensor.dtype == "BF16":  # bfloat16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _drop_from_page_cache(stream, tensor):
    """Tell the kernel these bytes will not be read again, so 14 GB of shards do not crowd the page cache
    (which the output being written, and other processes, can use better)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(stream.fileno(), tensor.offset, tensor.nbytes, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------------------------------------------------
# Finding the input files.
# ---------------------------------------------------------------------------------------------------------

def find_safetensors(input_path):
    """The safetensors files of a checkpoint: the index's shards, `model.safetensors`, or every shard."""
    if os.path.isfile(input_path):
        if not input_path.endswith(".safetensors"):
            raise CheckpointError(f"{input_path} is not a .safetensors file or a directory")
        return [input_path]
    if not os.path.isdir(input_path):
        raise CheckpointError(f"input path not found: {input_path}")
    index_path = os.path.join(input_path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = [os.path.join(input_path, name) for name in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path} lists shard {os.path.basename(path)}, which is missing")
        if files:
            return files
    single = os.path.join(input_path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(os.path.join(input_path, name) for name in os.listdir(input_path)
                   if name.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {input_path}")
    return files


# ---------------------------------------------------------------------------------------------------------
# The model config: from config.json, or inferred from the tensor shapes.
# ---------------------------------------------------------------------------------------------------------

def config_from_shapes(shapes):
    """A LlavaConfig inferred from {(part, local name): HF shape}; see the module docstring for fallbacks."""
    from llava_config import LlavaConfig  # imports mindformers: silenced by _import_config_module

    def dim(part, local, axis):
        shape = shapes.get((part, local))
        return shape[axis] if shape and len(shape) > axis else None

    vision = {
        "hidden_size": dim("vision", "embeddings.class_embedding", 0),
        "num_channels": dim("vision", "embeddings.patch_embedding.weight", 1),
        "patch_size": dim("vision", "embeddings.patch_embedding.weight", 2),
        "intermediate_size": dim("vision", "encoder.layers.0.mlp.fc1.weight", 0),
        "num_hidden_layers": max((layer + 1 for (part, local) in shapes if part == "vision"
                                  for layer in [hf_vision_layer(local)] if layer is not None), default=None),
    }
    positions = dim("vision", "embeddings.position_embedding.weight", 0)
    if positions and vision["patch_size"]:
        vision["image_size"] = math.isqrt(positions - 1) * vision["patch_size"]
    if vision["hidden_size"]:
        vision["num_attention_heads"] = max(1, vision["hidden_size"] // 64)
    text = {
        "hidden_size": dim("text", "embed_tokens.weight", 1),
        "vocab_size": dim("text", "embed_tokens.weight", 0),
        "intermediate_size": dim("text", "layers.0.mlp.gate_proj.weight", 0),
        "num_layers": max((int(match.group(1)) + 1 for (part, local) in shapes if part == "text"
                           for match in [HF_TEXT_LAYER.match(local)] if match), default=None),
    }
    if text["hidden_size"]:
        text["num_heads"] = max(1, text["hidden_size"] // 128)
    drop_unknown = lambda values: {key: value for key, value in values.items() if value is not None}
    return LlavaConfig(vision_config=drop_unknown(vision), text_config=drop_unknown(text))


def load_config(input_path, shapes):
    """(LlavaConfig, where it came from) for the checkpoint at `input_path`."""
    from llava_config import config_from_hf
    directory = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
    config_path = os.path.join(directory, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            try:
                hf = json.load(f)
            except ValueError as error:
                raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
        try:
            return config_from_hf(hf), config_path
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{config_path}: {error}") from error
    return config_from_shapes(shapes), "inferred from tensor shapes (no config.json)"


# ---------------------------------------------------------------------------------------------------------
# The conversion.
# ---------------------------------------------------------------------------------------------------------

_OUTPUT_DTYPES = (None, "float16", "bfloat16", "float32")
# What the converted arrays hold before the writer. For bfloat16 they keep the source's dtype (float16, or
# float32 for float32 and bfloat16 sources): the writer rounds them slice by slice, and casting a float16
# tensor to float32 first would double the largest copy in memory.
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}


@dataclass
class ConversionSummary:
    """What a conversion did."""

    output_path: str  # the .ckpt, or with model_parallel > 1 the directory holding rank_K/llava.ckpt
    config: object  # the LlavaConfig the checkpoint was checked against
    config_source: str
    source_files: list
    tensors_written: int = 0
    skipped: dict = field(default_factory=dict)  # HF name -> why it was not converted
    source_bytes: int = 0  # bytes of the converted tensors as stored in the input
    output_bytes: int = 0
    dtype: str = None  # requested output dtype; None kept the source dtypes
    seconds: float = 0.0
    model_parallel: int = 1
    output_files: list = field(default_factory=list)  # one .ckpt per rank (one in all without parallelism)


@dataclass(frozen=True)
class _Planned:
    """One output tensor: our name and its source."""

    name: str
    source: SourceTensor


def plan_conversion(input_path):
    """Read every header, build the config and check names and shapes before any tensor is read.

    Returns (plan in output order, config, config source, skipped, files).
    """
    files = find_safetensors(input_path)
    sources = [tensor for path in files for tensor in read_safetensors_header(path)]
    split = {}
    for tensor in sources:
        part, local = split_hf_name(tensor.name)
        if part is None:
            raise CheckpointError(f"{os.path.basename(tensor.path)}: unexpected tensor {tensor.name!r}: "
                                  "not a LLaVA vision tower, projector or language model name")
        split[tensor.name] = (part, local)
    config, config_source = load_config(input_path, {split[t.name]: t.shape for t in sources})
    layout = checkpoint_layout(config)
    num_vision_layers = config.vision_config.num_computed_layers

    planned, skipped = {}, {}
    for tensor in sources:
        name, reason = our_name(*split[tensor.name], num_vision_layers)
        if name is None:
            skipped[tensor.name] = reason
            continue
        where = f"{os.path.basename(tensor.path)}: {tensor.name!r} {list(tensor.shape)}"
        if name not in layout:
            raise CheckpointError(f"{where}: unexpected tensor (would be {name!r}, which the model does not have)")
        if name in planned:
            raise CheckpointError(f"{where}: duplicate tensor, {planned[name].source.name!r} in "
                                  f"{os.path.basename(planned[name].source.path)} is also {name!r}")
        check_tensor(name, stored_shape_from_hf(name, tensor.shape), layout, f"{where} converted")
        planned[name] = _Planned(name, tensor)
    check_complete(planned, layout, input_path)
    # Output in the model's own order: the same weights give the same file whatever the input's sharding.
    return [planned[name] for name in layout], config, config_source, skipped, files


def convert_llava(input_path, output_path, dtype=None, progress=True, model_parallel=1):
    """Convert an HF LLaVA-1.5 safetensors checkpoint at `input_path` into a `.ckpt` at `output_path`.

    Args:
        input_path: directory with `model.safetensors` or shards (+ index), and normally `config.json`;
            or one `.safetensors` file.
        output_path: the `.ckpt` to write; replaced atomically, untouched when the conversion fails. With
            `model_parallel` > 1, a directory that gets `rank_K/llava.ckpt` for each rank K (each file
            replaced atomically; a conversion that fails leaves no new file or directory).
        dtype: "float16", "bfloat16", "float32", or None to keep each source tensor's dtype.
        progress: show a progress bar on stderr.
        model_parallel: write the N per-rank shards of N-way tensor parallelism (1: one full checkpoint).

    Returns:
        ConversionSummary. Raises CheckpointError (a ValueError) naming the tensor or file at fault.
    """
    if dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of float16, bfloat16, float32 or None, got {dtype!r}")
    if not isinstance(model_parallel, int) or model_parallel < 1:
        raise ValueError(f"model_parallel must be a positive integer, got {model_parallel!r}")
    if model_parallel == 1 and os.path.isdir(output_path):
        raise CheckpointError(f"output path {output_path} is a directory; give a .ckpt file name")
    if model_parallel > 1 and os.path.exists(output_path) and not os.path.isdir(output_path):
        raise CheckpointError(f"output path {output_path} is a file; with model_parallel={model_parallel} give "
                              "a directory (rank_K/llava.ckpt are written in it)")
    started = time.monotonic()
    plan, config, config_source, skipped, files = plan_conversion(input_path)
    logger.debug("config: %s", config_source)
    for name, reason in skipped.items():
        logger.debug("skipped %s: %s", name, reason)
    if model_parallel > 1:
        outputs = [os.path.join(output_path, RANK_DIR.format(rank), "llava.ckpt") for rank in range(model_parallel)]
        try:  # head counts guessed from the shapes (no config.json) are not held against N
            sharded_layout(config, model_parallel, check_heads=config_source.endswith("config.json"))
        except ValueError as error:
            raise CheckpointError(f"cannot write {model_parallel} shards: {error}") from error
    else:
        outputs = [output_path]
    summary = ConversionSummary(os.path.abspath(output_path), config, config_source, files, skipped=skipped,
                                dtype=dtype, model_parallel=model_parallel,
                                output_files=[os.path.abspath(path) for path in outputs])
    check_outputs_spare_inputs(outputs, input_path, files)
    total = sum(item.source.nbytes for item in plan)
    # The writers remove their files, and the directories they made, if the conversion fails or is interrupted.
    with contextlib.ExitStack() as stack:
        # Unbuffered: each tensor is one large read straight into its array.
        streams = {path: stack.enter_context(open(path, "rb", buffering=0)) for path in files}
        bar = stack.enter_context(_ProgressBar(total, len(plan), progress))
        writers = [stack.enter_context(CheckpointWriter(path)) for path in outputs]
        for item in plan:
            out_dtype = dtype or _DTYPE_NAMES[item.source.dtype]
            # Read, convert (a transposed copy where the layout needs one) and write straight from the array.
            array = read_tensor(streams[item.source.path], item.source)
            array = stored_from_hf(item.name, array, _NUMPY_DTYPES[out_dtype])
            for rank, writer in enumerate(writers):
                writer.write(item.name, shard(item.name, array, rank, model_parallel), out_dtype)
            del array
            summary.tensors_written += 1
            summary.source_bytes += item.source.nbytes
            bar.advance(item.source.nbytes)
        summary.output_bytes = sum(writer.bytes_written for writer in writers)
    summary.seconds = time.monotonic() - started
    return summary


def check_outputs_spare_inputs(outputs, input_path, files):
    """Raise CheckpointError if an output file would replace an input: a safetensors file, the index or
    config.json (a conversion that writes over its own weights would destroy them, and could not even read them)."""
    directory = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
    inputs = [*files, *(os.path.join(directory, name) for name in ("config.json", "model.safetensors.index.json"))]
    existing = [path for path in inputs if os.path.exists(path)]
    for output in outputs:
        for path in existing:
            same = os.path.samefile(output, path) if os.path.exists(output) else False  # hard links too
            if same or os.path.realpath(output) == os.path.realpath(path):
                raise CheckpointError(f"output {output} is the input file {path}: writing it would destroy the "
                                      "weights being converted; give another --output_path")


class _ProgressBar(contextlib.AbstractContextManager):
    """Bytes converted and tensors done, on stderr (tqdm); does nothing when disabled."""

    def __init__(self, total_bytes, total_tensors, enabled):
        self._bar, self._tensors, self._total_tensors = None, 0, total_tensors
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, file=sys.stderr,
                             desc="converting", mininterval=0.5, dynamic_ncols=True)

    def advance(self, nbytes):
        self._tensors += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._tensors}/{self._total_tensors} tensors", refresh=False)
            self._bar.update(nbytes)

    def __exit__(self, *exc_info):
        if self._bar is not None:
            self._bar.close()
        return False


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------

CONVERTERS = {"llava": convert_llava}


def _import_config_module(verbose):
    """Import llava_config (and with it mindformers) up front, silenced unless --verbose.

    While being imported, mindformers logs warnings about optional modules to stdout and MindSpore prints
    deprecation notices to stderr; none of it concerns a conversion.
    """
    with contextlib.ExitStack() as stack:
        if not verbose:
            stack.enter_context(_silenced_output())
        import llava_config  # noqa: F401


@contextlib.contextmanager
def _silenced_output():
    """Point file descriptors 1 and 2 at /dev/null (catches native and Python writes alike)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Convert HuggingFace LLaVA-1.5 safetensors to a llava-ms .ckpt.")
    parser.add_argument("--model", required=True, help="model family; only 'llava' is supported")
    parser.add_argument("--input_path", required=True,
                        help="HF checkpoint directory (safetensors + config.json) or one .safetensors file")
    parser.add_argument("--output_path", required=True,
                        help="the .ckpt to write; with --model_parallel N > 1 a directory for rank_K/llava.ckpt")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="cast every tensor to this dtype (default: keep the source dtypes)")
    parser.add_argument("--model_parallel", type=_positive_int, default=1, metavar="N",
                        help="write the per-rank shards of N-way tensor parallelism (default 1: one full .ckpt)")
    parser.add_argument("--verbose", action="store_true",
                        help="progress bar, skipped tensors, config source; tracebacks on errors")
    return parser.parse_args(argv)


def _positive_int(value):
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _set_up_logging(verbose):
    """This script's messages, bare, on stderr; other libraries' loggers are left as they are."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # so SIGTERM also unwinds through the writer's cleanup


def main(argv=None):
    args = parse_args(argv)
    _set_up_logging(args.verbose)
    if args.model not in CONVERTERS:
        print(f"convert_weight: error: --model {args.model!r} is not supported; choose from "
              f"{', '.join(CONVERTERS)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _import_config_module(args.verbose)
        summary = CONVERTERS[args.model](args.input_path, args.output_path, args.dtype,
                                         progress=args.verbose or sys.stderr.isatty(),
                                         model_parallel=args.model_parallel)
    except KeyboardInterrupt:
        print("convert_weight: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError) as error:
        if args.verbose:
            raise
        print(f"convert_weight: error: {error}", file=sys.stderr)
        return 1
    written = summary.output_path
    if summary.model_parallel > 1:
        written += f" ({RANK_DIR.format(0)} .. {RANK_DIR.format(summary.model_parallel - 1)}/llava.ckpt)"
    logger.info("wrote %s: %d tensors, %.2f GB (%s), %d skipped, in %.1f s", written,
                summary.tensors_written, summary.output_bytes / 1e9, summary.dtype or "source dtypes",
                len(summary.skipped), summary.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
