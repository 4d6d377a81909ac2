"""Convert HuggingFace LLaVA-1.5 safetensors weights into a llava-ms checkpoint: a MindSpore `.ckpt`, or
MindSpore-loadable safetensors (the format MindFormers 1.6+ uses).

Usage::

    python convert_weight.py --model llava --input_path HF_DIR --output_path OUT.ckpt \
        [--format ckpt|safetensors] [--dtype float16|bfloat16|float32] [--model_parallel N] [--verbose]

`run_mindformer.py --load_checkpoint` also loads an HF folder as it is; converting is for a file in one piece
(e.g. to move it to Ascend machines) or per-rank shards written once for many runs.

`HF_DIR` holds `model.safetensors`, or shards `model-*.safetensors` with or without
`model.safetensors.index.json` (a single `.safetensors` file may be given instead of a directory), and
normally `config.json`. All three spellings of the tensor names are accepted: the hub files
(`language_model.model.*`), transformers 4.5x `state_dict()` (`model.language_model.*`) and transformers v5
saves (`vision_tower.*` without `vision_model.`). Every safetensors header is checked by the `safetensors`
package. Our layout is HF's (research/llava/llava_layout.py), so tensors are renamed, not rearranged (the patch
embedding's conv weight becomes the linear map it is).

`--dtype` defaults to keeping each source tensor's dtype (the hub weights are float16, so they stay float16);
give it to cast every tensor. The output records the layout version and the model's architecture, so
`run_mindformer.py` takes the model's sizes from it.

Without `config.json` the sizes are inferred from the tensor shapes; what shapes cannot tell falls back to
LLaVA-1.5-7B: `vision_feature_layer=-2`, `image_token_id=32000`, attention heads from a head size of 64
(CLIP) and 128 (LLaMA). Head counts do not change the converted checkpoint; the feature layer does (it
decides which vision layers are stored).

`--model_parallel N` (N > 1) writes the per-rank checkpoints of N-way tensor parallelism instead of one
file: `--output_path` is then a directory and gets `rank_K/llava.ckpt` (or `.safetensors`) for K = 0 .. N-1
(the layout `run_mindformer.py --load_checkpoint DIR` loads directly). The input is still read once, each
rank's slice of every tensor going to its own file. N must divide every split dimension and (when config.json
gives them) the head counts; that is checked before anything is written.

Tensors LLaVA never uses are skipped on purpose: the vision `post_layernorm`, the vision layers after
`vision_feature_layer` (layer 24 of 24 for the 7B), and rotary `inv_freq` / `position_ids` buffers. Any
other name is an error, as are wrong shapes, missing tensors and non-finite values; names and shapes are checked
from the headers before anything is written.

The conversion streams: each tensor is read on its own and appended to the output straight from the array, so
memory holds about one tensor on top of what importing MindSpore/mindformers costs (the 7B figures are in
bench/RESULTS.md). The output appears only when complete (temporary file + rename): after an error, Ctrl-C or
SIGTERM nothing new is left at the output path (an earlier file there is kept as it was).

A progress bar (tensors and bytes) goes to stderr when stderr is a terminal or with --verbose. Errors are
one line on stderr and a non-zero exit (1; 2 for usage errors; 130 when interrupted by Ctrl-C or SIGTERM);
on success one summary line goes to stderr. --verbose adds the config's source, the tensors deliberately
skipped, mindformers' import messages and tracebacks.
"""
import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "research", "llava"))
from llava_runtime import leave_at_once_on_signals  # noqa: E402

INTERRUPTED = "convert_weight: interrupted; nothing was written"
if __name__ == "__main__":  # numpy and MindSpore (~1 s) load next: Ctrl-C meanwhile is one line, not an abort
    leave_at_once_on_signals(INTERRUPTED)
import numpy as np  # noqa: E402
from llava_checkpoint import CheckpointError, CheckpointWriter, SafetensorsWriter  # noqa: E402
from llava_layout import (HF_TEXT_LAYER, hf_vision_layer, shard, shard_shape, stored_from_hf,  # noqa: E402
                          stored_shape_from_hf)

logger = logging.getLogger("convert_weight")

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


def source_config(folder):
    """(LlavaConfig, where it came from) of an HF checkpoint (llava_weights.HFFolder)."""
    if folder.hf_config is not None:
        return folder.config(), folder.config_path
    return config_from_shapes(folder.shapes()), "inferred from tensor shapes (no config.json)"


# ---------------------------------------------------------------------------------------------------------
# The conversion.
# ---------------------------------------------------------------------------------------------------------

_OUTPUT_DTYPES = (None, "float16", "bfloat16", "float32")
FORMATS = {"ckpt": ".ckpt", "safetensors": ".safetensors"}
# What the converted arrays hold before the writer. For bfloat16 they keep the source's dtype (float16, or
# float32 for float32 and bfloat16 sources): the writer rounds them slice by slice, and casting a float16
# tensor to float32 first would double the largest copy in memory.
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}
_SOURCE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class ConversionSummary:
    """What a conversion did."""

    output_path: str  # the file, or with model_parallel > 1 the directory holding rank_K/llava.<format>
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
    output_files: list = field(default_factory=list)  # one file per rank (one in all without parallelism)


def convert_llava(input_path, output_path, dtype=None, progress=True, model_parallel=1, fmt="ckpt"):
    """Convert an HF LLaVA-1.5 safetensors checkpoint at `input_path` into a llava-ms checkpoint.

    Args:
        input_path: directory with `model.safetensors` or shards (+ index), and normally `config.json`;
            or one `.safetensors` file.
        output_path: the file to write; replaced atomically, untouched when the conversion fails. With
            `model_parallel` > 1, a directory that gets `rank_K/llava.<fmt>` for each rank K (each file
            replaced atomically; a conversion that fails leaves no new file or directory).
        dtype: "float16", "bfloat16", "float32", or None to keep each source tensor's dtype.
        progress: show a progress bar on stderr.
        model_parallel: write the N per-rank shards of N-way tensor parallelism (1: one full checkpoint).
        fmt: "ckpt" (MindSpore's protobuf checkpoint) or "safetensors" (what mindspore.load_checkpoint reads with
            format="safetensors").

    Returns:
        ConversionSummary. Raises CheckpointError (a ValueError) naming the tensor or file at fault.
    """
    from llava_weights import HFFolder, RANK_DIR, check_finite, metadata_of, sharded_layout

    if dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of float16, bfloat16, float32 or None, got {dtype!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not isinstance(model_parallel, int) or model_parallel < 1:
        raise ValueError(f"model_parallel must be a positive integer, got {model_parallel!r}")
    if model_parallel == 1 and os.path.isdir(output_path):
        raise CheckpointError(f"output path {output_path} is a directory; give a {FORMATS[fmt]} file name")
    if model_parallel > 1 and os.path.exists(output_path) and not os.path.isdir(output_path):
        raise CheckpointError(f"output path {output_path} is a file; with model_parallel={model_parallel} give "
                              f"a directory (rank_K/llava{FORMATS[fmt]} are written in it)")
    if not os.path.exists(input_path):
        raise CheckpointError(f"input path not found: {input_path}")
    if os.path.isfile(input_path) and not input_path.endswith(".safetensors"):
        raise CheckpointError(f"{input_path} is not a .safetensors file or a directory")
    started = time.monotonic()
    folder = HFFolder(input_path)
    config, config_source = source_config(folder)
    plan, skipped = folder.plan(config)
    logger.debug("config: %s", config_source)
    for name, reason in skipped.items():
        logger.debug("skipped %s: %s", name, reason)
    if model_parallel > 1:
        outputs = [os.path.join(output_path, RANK_DIR.format(rank), "llava" + FORMATS[fmt])
                   for rank in range(model_parallel)]
        try:  # head counts guessed from the shapes (no config.json) are not held against N
            sharded_layout(config, model_parallel, check_heads=config_source.endswith("config.json"))
        except ValueError as error:
            raise CheckpointError(f"cannot write {model_parallel} shards: {error}") from error
    else:
        outputs = [output_path]
    files = [file.path for file in folder.files]
    summary = ConversionSummary(os.path.abspath(output_path), config, config_source, files, skipped=skipped,
                                dtype=dtype, model_parallel=model_parallel,
                                output_files=[os.path.abspath(path) for path in outputs])
    check_outputs_spare_inputs(outputs, input_path, files)
    out_dtypes = {name: dtype or _SOURCE_DTYPES[file.tensors[hf_name][0]] for name, file, hf_name in plan}
    sizes = {name: file.tensors[hf_name][3] for name, file, hf_name in plan}
    metadata = metadata_of(config)
    # The writers remove their files, and the directories they made, if the conversion fails or is interrupted.
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_ProgressBar(sum(sizes.values()), len(plan), progress))
        # A safetensors header lists every tensor first: this rank's shape and dtype of each.
        declared = [(name, shard_shape(name, stored_shape_from_hf(name, file.tensors[hf_name][1]), model_parallel),
                     out_dtypes[name]) for name, file, hf_name in plan]
        writers = [stack.enter_context(CheckpointWriter(path, metadata) if fmt == "ckpt" else
                                       SafetensorsWriter(path, declared, metadata)) for path in outputs]
        for name, file, hf_name in plan:
            array = file.read(hf_name)
            if array.dtype == np.uint16:  # bfloat16 bits: a float32 holds them exactly
                array = (array.astype(np.uint32) << 16).view(np.float32)
            check_finite(name, array, os.path.basename(file.path))
            array = stored_from_hf(name, array, _NUMPY_DTYPES[out_dtypes[name]])
            for rank, writer in enumerate(writers):
                writer.write(name, np.ascontiguousarray(shard(name, array, rank, model_parallel)), out_dtypes[name])
            del array
            summary.tensors_written += 1
            summary.source_bytes += sizes[name]
            bar.advance(sizes[name])
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
    """Import llava_weights (and with it mindformers) up front, silenced unless --verbose.

    While being imported, mindformers logs warnings about optional modules to stdout and MindSpore prints
    deprecation notices to stderr; none of it concerns a conversion.
    """
    with contextlib.ExitStack() as stack:
        if not verbose:
            stack.enter_context(_silenced_output())
        import llava_weights  # noqa: F401  (with it llava_config, mindformers and the CPU kernels)


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
                        help="the file to write; with --model_parallel N > 1 a directory for rank_K/llava.<format>")
    parser.add_argument("--format", choices=list(FORMATS), default="ckpt", dest="fmt",
                        help="ckpt (MindSpore's checkpoint, default) or safetensors (MindSpore-loadable safetensors)")
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
    try:
        leave_at_once_on_signals(INTERRUPTED)
        _import_config_module(args.verbose)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        summary = CONVERTERS[args.model](args.input_path, args.output_path, args.dtype,
                                         progress=args.verbose or sys.stderr.isatty(),
                                         model_parallel=args.model_parallel, fmt=args.fmt)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError) as error:
        if args.verbose:
            raise
        print(f"convert_weight: error: {error}", file=sys.stderr)
        return 1
    written = summary.output_path
    if summary.model_parallel > 1:
        written += (f" (rank_0 .. rank_{summary.model_parallel - 1}/"
                    f"{os.path.basename(summary.output_files[0])})")
    logger.info("wrote %s: %d tensors, %.2f GB (%s), %d skipped, in %.1f s", written,
                summary.tensors_written, summary.output_bytes / 1e9, summary.dtype or "source dtypes",
                len(summary.skipped), summary.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
