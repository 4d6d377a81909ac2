"""Where a model's weights come from, and how they get into its parameters.

`--load_checkpoint PATH` takes any of:

    an HF folder     config.json and model.safetensors, or shards with or without their index, in any of the
                     three spellings of the tensor names (llava_layout: hub files, transformers 4.5x and v5)
    a llava-ms file  a .ckpt or .safetensors written by convert_weight.py or by training, or a folder holding one
    rank shards      DIR/rank_0/ .. DIR/rank_{N-1}/, a llava-ms file each (convert_weight.py --model_parallel N,
                     or an earlier run with --auto_trans_ckpt True)

Each source yields our parameter names in our stored layout, one tensor at a time, checked against the model:
an unexpected, mis-shaped, missing or non-finite tensor is named. Under N-way model parallelism a full source
(an HF folder or a llava-ms file) is sliced while it streams (MindFormers' `auto_trans_ckpt`) and each rank
keeps its own slices only; from safetensors a rank reads little more than its slices (a slice of rows is one
contiguous range of the file).

The model's matrices start without memory (MindSpore's meta device, see llava_model._matrix), so a tensor read
from the file becomes its parameter's data with no further copy, in the parameter's dtype: peak memory is the
weights themselves plus one tensor. A parameter that already holds data (a model loaded twice, compiled steps
around it) is overwritten in place.
"""
import json
import os
import re

import numpy as np

import llava_kernels
from llava_checkpoint import (CheckpointError, CheckpointWriter, SafetensorsFile, check_complete, check_tensor,
                              checkpoint_metadata, float_to_bfloat16_bits, iter_checkpoint, read_ahead)
from llava_config import architecture, config_from_hf
from llava_layout import (LAYOUT_VERSION, checkpoint_layout, our_name, shard, shard_shape, split_axis,
                          split_hf_name, stored_from_hf, stored_shape_from_hf)
from llava_runtime import interruption_point

RANK_DIR = "rank_{}"
WEIGHT_FILE_SUFFIXES = (".ckpt", ".safetensors")


def metadata_of(config):
    """What llava-ms writes into every checkpoint file: the layout version and the model's architecture."""
    return {"layout": LAYOUT_VERSION, "architecture": architecture(config)}


def _as_float(array):
    """bfloat16 bit patterns (uint16, as safetensors files give them) -> float32; other arrays as they are."""
    return (array.astype(np.uint32) << 16).view(np.float32) if array.dtype == np.uint16 else array


# ------------------------------------------------------------------------------------------- HF folders

def find_safetensors(directory):
    """The safetensors files of an HF checkpoint folder: the index's shards, model.safetensors, or every shard."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map") or {}
        except (ValueError, AttributeError) as error:
            raise CheckpointError(f"{index_path} is not a safetensors index ({error})") from None
        files = [os.path.join(directory, name) for name in sorted(set(map(str, weight_map.values())))]
        for path in files:
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path} lists shard {os.path.basename(path)}, which is missing")
        if files:
            return files
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {directory}")
    return files


def read_hf_config(directory):
    """The dict of an HF folder's config.json, or None when there is none."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(hf_config).__name__}, not an object")
    return hf_config


class HFFolder:
    """A HuggingFace LLaVA-1.5 checkpoint: safetensors files (a folder of them, or one file) and config.json.

    `plan(config)` checks every header against the model `config` describes before any tensor is read:
    names in any of the three spellings, shapes, duplicates, completeness. Tensors LLaVA never uses are
    skipped on purpose: the vision post_layernorm, the vision layers after vision_feature_layer, rotary buffers.
    """

    def __init__(self, path):
        self.path = path
        directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        paths = find_safetensors(path) if os.path.isdir(path) else [path]
        self.files = [SafetensorsFile(file) for file in paths]
        self.hf_config = read_hf_config(directory)
        self.config_path = os.path.join(directory, "config.json")
        self.hf_tensors = {}  # HF name -> (SafetensorsFile, (part, local name))
        for file in self.files:
            for name in file.tensors:
                part, local = split_hf_name(name)
                if part is None:
                    raise CheckpointError(f"{os.path.basename(file.path)}: unexpected tensor {name!r}: not a LLaVA "
                                          "vision tower, projector or language model name")
                self.hf_tensors[name] = (file, (part, local))

    def config(self, **settings):
        """The LlavaConfig of config.json (`settings`: other LlavaConfig arguments)."""
        if self.hf_config is None:
            raise CheckpointError(f"{self.path} has no config.json: an HF checkpoint folder needs one to say what "
                                  "model its tensors make")
        try:
            return config_from_hf(self.hf_config, **settings)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{self.config_path}: {error}") from None

    def shapes(self):
        """{(part, local name): HF shape} of every tensor (for a config inferred from shapes)."""
        return {split: file.tensors[name][1] for name, (file, split) in self.hf_tensors.items()}

    def plan(self, config):
        """([(our name, file, HF name)] in the model's own order, {HF name: why it is skipped})."""
        layout = checkpoint_layout(config)
        planned, skipped = {}, {}
        for hf_name, (file, split) in self.hf_tensors.items():
            name, reason = our_name(*split, config.vision_config.num_computed_layers)
            if name is None:
                skipped[hf_name] = reason
                continue
            shape = file.tensors[hf_name][1]
            where = f"{os.path.basename(file.path)}: {hf_name!r} {list(shape)}"
            if name not in layout:
                raise CheckpointError(f"{where}: unexpected tensor (would be {name!r}, which the model does not have)")
            if name in planned:
                raise CheckpointError(f"{where}: duplicate tensor, {planned[name][2]!r} in "
                                      f"{os.path.basename(planned[name][1].path)} is also {name!r}")
            check_tensor(name, stored_shape_from_hf(name, shape), layout, where)
            planned[name] = (name, file, hf_name)
        check_complete(planned, layout, self.path)
        # The model's own order: the same weights give the same file whatever the input's sharding.
        return [planned[name] for name in layout], skipped

    def tensors(self, config, rank=0, size=1):
        """Yield (name, this rank's slice in our stored layout), checked against `config`'s model."""
        plan = self.plan(config)[0]
        requests = []
        for name, file, hf_name in plan:
            rows = None
            if size > 1 and split_axis(name) == 0:  # this rank's rows: one contiguous range of the file
                count = file.tensors[hf_name][1][0] // size
                rows = slice(rank * count, (rank + 1) * count)
            requests.append((file, hf_name, rows))
        for (name, _, _), (_, _, rows), array in zip(plan, requests, read_ahead(requests)):
            if rows is None:
                array = shard(name, array, rank, size)
            yield name, stored_from_hf(name, _as_float(array))


# ------------------------------------------------------------------------------------------- llava-ms files

def resolve_weights_file(path):
    """A llava-ms .ckpt / .safetensors file, or a folder holding exactly one."""
    if os.path.isdir(path):
        files = sorted(name for name in os.listdir(path)
                       if name.endswith(WEIGHT_FILE_SUFFIXES) and not name.startswith("."))
        if len(files) != 1:
            raise CheckpointError(f"{path}: expected one .ckpt or .safetensors file in the folder, found {len(files)}"
                                  + (f" ({', '.join(files)})" if files else ""))
        return os.path.join(path, files[0])
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


class WeightsFile:
    """A .ckpt or .safetensors written by llava-ms: our names and layout, and metadata saying so."""

    def __init__(self, path):
        self.path = resolve_weights_file(path)
        if self.path.endswith(".safetensors"):
            self._safetensors = SafetensorsFile(self.path)
            metadata = self._safetensors.llava_metadata()
        else:
            self._safetensors = None
            metadata = checkpoint_metadata(self.path)
        if not metadata or metadata.get("layout") != LAYOUT_VERSION:
            raise CheckpointError(f"{self.path} was not written by this version of llava-ms (its linear weights may "
                                  "be stored in another order): convert the HF weights again with convert_weight.py, "
                                  "or load the HF folder itself")
        self.architecture = metadata["architecture"]

    def _all_tensors(self):
        if self._safetensors is None:
            yield from iter_checkpoint(self.path)
        else:
            names = list(self._safetensors.tensors)
            arrays = read_ahead((self._safetensors, name, None) for name in names)
            for name, array in zip(names, arrays):
                yield name, _as_float(array)

    def tensors(self, layout, rank=0, size=1):
        """Yield (name, this rank's slice), checking names and shapes against `layout` (the full model's when
        the file is sliced, size > 1) and completeness."""
        seen = set()
        for name, array in self._all_tensors():
            check_tensor(name, array.shape, layout, self.path)
            seen.add(name)
            yield name, shard(name, array, rank, size)
        check_complete(seen, layout, self.path)


def rank_directory(directory, rank):
    """`directory/rank_K`, with an error naming a missing rank folder."""
    path = os.path.join(directory, RANK_DIR.format(rank))
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: no directory {RANK_DIR.format(rank)} for rank {rank}; a sharded "
                              f"checkpoint needs rank_0 ... rank_N-1 for model_parallel N")
    return path


def is_sharded_directory(path):
    return os.path.isdir(path) and os.path.isdir(os.path.join(path, RANK_DIR.format(0)))


def is_hf_folder(path):
    """True for an HF checkpoint: a folder with config.json, a safetensors index or safetensors files without
    llava-ms metadata; or one such file."""
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model.safetensors.index.json")):
            return True
        files = [os.path.join(path, name) for name in os.listdir(path) if name.endswith(".safetensors")]
        return bool(files) and SafetensorsFile(files[0]).llava_metadata() is None
    return path.endswith(".safetensors") and SafetensorsFile(path).llava_metadata() is None


def checkpoint_architecture(path):
    """The architecture a checkpoint says it holds (llava_config.architecture), or None when it says nothing."""
    if is_hf_folder(path):
        folder = HFFolder(path)
        if folder.hf_config is None and not os.path.isdir(path):
            return None  # a lone safetensors file: the YAML says what it holds
        return architecture(folder.config())  # a folder must say it (config.json)
    if is_sharded_directory(path):
        return WeightsFile(rank_directory(path, 0)).architecture
    return WeightsFile(path).architecture


# ------------------------------------------------------------------------------------------- sharding checks

def check_heads_divisible(config, size):
    """Raise ValueError unless `size` divides the attention head counts of both towers (a rank holds whole
    heads; the model refuses the same at build time)."""
    for heads, what in ((config.vision_config.num_attention_heads, "vision attention heads"),
                        (config.text_config.num_heads, "text attention heads")):
        if heads % size:
            raise ValueError(f"model_parallel={size} does not divide the {heads} {what}")


def sharded_layout(config, size, check_heads=True):
    """Name -> shape of one rank's parameters under `size`-way model parallelism.

    Raises ValueError naming the heads (`check_heads`: off when the head counts are only guessed) or the
    tensor and dimension that `size` does not divide.
    """
    if check_heads and size > 1:
        check_heads_divisible(config, size)
    return {name: shard_shape(name, shape, size) for name, shape in checkpoint_layout(config).items()}


# ------------------------------------------------------------------------------------------- loading

def check_finite(name, values, source):
    """Raise a CheckpointError naming the tensor and the position of its first NaN or infinity (values: float32,
    float16 or bfloat16 bit patterns)."""
    index = llava_kernels.first_nonfinite(values)
    if index >= 0:
        position = tuple(int(i) for i in np.unravel_index(index, values.shape))
        value = _as_float(values.reshape(-1)[index:index + 1])[0]
        raise CheckpointError(f"{source}: tensor {name!r} holds {value} at {position}: the weights are damaged")


def parameter_values(array, parameter):
    """`array` as the data of `parameter`: a MindSpore tensor sharing the memory of a numpy array of the
    parameter's dtype (bfloat16: its bit patterns), and that numpy array."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    if parameter.dtype == ms.bfloat16:
        values = float_to_bfloat16_bits(array)
        return ms.Tensor.from_numpy(values).view(ms.bfloat16), values
    values = np.ascontiguousarray(array, ms.dtype_to_nptype(parameter.dtype))
    return ms.Tensor.from_numpy(values), values


def load_tensors_into(model, tensors, source):
    """Set `model`'s weights from (name, numpy array) pairs, checking every name, shape and value.

    Raises CheckpointError naming the first unexpected, mis-shaped, non-finite or missing tensor of `source`.
    Values are cast to each parameter's dtype (a float16 checkpoint loads into a float32 model and back).
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    parameters = model.weights()
    layout = {name: tuple(param.shape) for name, param in parameters.items()}
    seen = set()
    for name, array in tensors:
        interruption_point()  # Ctrl-C between tensors (llava_runtime)
        check_tensor(name, array.shape, layout, source)
        parameter = parameters[name]
        data, values = parameter_values(array, parameter)
        check_finite(name, values, source)
        if parameter.is_meta:  # no memory yet: the array becomes its data, without a copy
            parameter.set_data(data)
        else:  # in place: steps compiled before this load (set_data would swap the buffer under them) see it too
            ms.ops.assign(parameter, data)
        seen.add(name)
    check_complete(seen, layout, source)


def load_weights(model, path, auto_trans_ckpt=False, save_shards_to=None):
    """Load this rank's weights into `model` from any source of the module docstring; returns a description.

    A full source under model parallelism needs `auto_trans_ckpt` (as in MindFormers): each rank streams it and
    keeps only its slices, and with `save_shards_to` also writes them as `save_shards_to/rank_K/llava.ckpt`.
    """
    tensor_parallel = model.tensor_parallel
    rank, size = tensor_parallel.rank, tensor_parallel.size
    if is_sharded_directory(path):
        present = {name for name in os.listdir(path) if re.fullmatch(RANK_DIR.format(r"\d+"), name)}
        for index in range(size):
            rank_directory(path, index)  # names the first missing rank directory
        if present != {RANK_DIR.format(index) for index in range(size)}:
            raise CheckpointError(f"{path} holds shards for {len(present)} ranks but model_parallel is {size}; "
                                  "reshard from the full checkpoint (--auto_trans_ckpt True) or convert with "
                                  f"--model_parallel {size}")
        source = WeightsFile(rank_directory(path, rank))
        load_tensors_into(model, source.tensors(sharded_layout(model.config, size)), source.path)
        return f"{source.path} (rank {rank} of {size})"
    if is_hf_folder(path):
        source, description = HFFolder(path), f"HF folder {path}"
        if os.path.isdir(path):
            source.config()  # a folder must say what model it holds
        tensors = lambda rank_, size_: source.tensors(model.config, rank_, size_)  # noqa: E731
    else:
        source = WeightsFile(path)
        description = source.path
        tensors = lambda rank_, size_: source.tensors(checkpoint_layout(model.config), rank_, size_)  # noqa: E731
    if size > 1 and not auto_trans_ckpt:
        raise CheckpointError(f"{path} is a full checkpoint but model_parallel={size}: pass --auto_trans_ckpt True "
                              "to slice it while loading, or a directory of rank_K/ shards")
    if size == 1 or save_shards_to is None:
        load_tensors_into(model, tensors(rank, size), description)
        return description
    target = os.path.join(save_shards_to, RANK_DIR.format(rank), "llava.ckpt")
    with CheckpointWriter(target, metadata_of(model.config)) as writer:
        load_tensors_into(model, _written(tensors(rank, size), writer), description)
    return description


def _written(tensors, writer):
    for name, array in tensors:
        writer.write(name, array)
        yield name, array


def save_weights(model, path, dtype="float32"):
    """Write every weight of `model` to a llava-ms `.ckpt` at `path` (atomic); returns the file size in bytes."""
    with CheckpointWriter(path, metadata_of(model.config)) as writer:
        for name, param in model.weights().items():
            writer.write(name, param.asnumpy(), dtype=dtype)
    return os.path.getsize(path)
