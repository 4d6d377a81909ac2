"""LLaVA checkpoints: the parameter layout, and MindSpore `.ckpt` files read and written one tensor at a time.

A MindSpore `.ckpt` is a protobuf `Checkpoint { repeated Value value = 1; }`. Concatenated serialized
`Checkpoint` messages parse as one (repeated fields append), and MindSpore itself writes large tensors as
several consecutive `Value`s with the same tag. So a writer can append tensor after tensor, and a reader can
walk the file record by record: neither needs more than one tensor in memory, which keeps a 7B conversion
(14 GB of fp16) and a sharded load far below the machine's RAM. Files written here load with
`mindspore.load_checkpoint` too.

What each tensor holds and in which order it is stored: llava_layout.py.
"""
import contextlib
import fcntl
import glob
import math
import os
import tempfile

import numpy as np
from mindspore.train.checkpoint_pb2 import Checkpoint

from llava_runtime import check_directory_path

# Each protobuf record is kept under MindSpore's own slice size, so MindSpore's reader accepts the file.
_SLICE_BYTES = 512 * 1024 * 1024
_NUMPY_OF_CKPT_TYPE = {"Float16": np.float16, "Float32": np.float32, "Float64": np.float64, "Int8": np.int8,
                       "Int32": np.int32, "Int64": np.int64, "UInt8": np.uint8, "Bool": np.bool_}
_CKPT_TYPE_OF_NUMPY = {np.dtype(v): k for k, v in _NUMPY_OF_CKPT_TYPE.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not fit what was expected; the message names the tensor."""


# Values rounded to bfloat16 per slice: whole-tensor float32/uint32 temporaries would be several times the
# size of a 7B embedding (263 MB in float16) and dominate a conversion's peak memory.
_BFLOAT16_SLICE = 1 << 22


def _float_to_bfloat16_bits(array):
    """float -> bfloat16 bit patterns (round to nearest even), as uint16 of the same shape."""
    flat = np.ascontiguousarray(array).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint16)
    for start in range(0, flat.size, _BFLOAT16_SLICE):
        bits = flat[start:start + _BFLOAT16_SLICE].astype(np.float32).view(np.uint32)
        rounding = ((bits >> 16) & 1) + 0x7FFF
        out[start:start + _BFLOAT16_SLICE] = (bits + rounding) >> 16
    return out.reshape(np.shape(array))


def _bfloat16_bits_to_float(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _length_delimited(field_number, length):
    """Protobuf key (wire type 2) and length of a bytes/message field."""
    return _encode_varint(field_number << 3 | 2) + _encode_varint(length)


def _record_header(name, shape, type_name, content_bytes):
    """The bytes of `Checkpoint{value{tag, tensor{dims, tensor_type, tensor_content}}}` up to the tensor's
    content, which follows it verbatim: protobuf writes fields in number order and tensor_content is the last
    one of the last field, so header + content is exactly what SerializeToString gives (a test checks it),
    without building the content into a message (two copies of each tensor, a quarter of a 7B conversion)."""
    value = Checkpoint().value.add()
    value.tag = name
    value.tensor.dims.extend(shape)
    value.tensor.tensor_type = type_name
    tensor_fields = value.tensor.SerializePartialToString()  # required tensor_content not set yet
    content_key = _length_delimited(3, content_bytes)  # TensorProto.tensor_content = 3
    value.ClearField("tensor")
    value_fields = value.SerializePartialToString()  # the tag
    tensor_length = len(tensor_fields) + len(content_key) + content_bytes
    value_prefix = value_fields + _length_delimited(2, tensor_length) + tensor_fields + content_key  # Value.tensor = 2
    return _length_delimited(1, len(value_prefix) + content_bytes) + value_prefix  # Checkpoint.value = 1


PARTIAL_PREFIX = ".partial-"  # a CheckpointWriter's file until it is complete; never a checkpoint to load


def _missing_directories(path):
    """`path` and those of its ancestors that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_stale_partials(directory):
    """Remove the partial files of writers that are gone (killed with -9, or the machine went down): a live writer
    holds a lock on its partial file, which the system releases when the process ends however it ends."""
    for path in glob.glob(os.path.join(glob.escape(directory), PARTIAL_PREFIX + "*.ckpt")):
        with contextlib.suppress(OSError), open(path, "rb") as stale:
            fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its writer is alive
            os.remove(path)


class CheckpointWriter:
    """Appends tensors to a `.ckpt` one at a time; the file appears at `path` only when closed cleanly.

    Use as a context manager: on an exception the temporary file is removed and nothing is left at `path`, nor the
    directories made for it. The temporary file (`.partial-*.ckpt` next to `path`) is locked while it is written;
    partial files that no writer holds (left by `kill -9`) are removed when the next writer starts there.
    """

    def __init__(self, path):
        self.path = os.path.abspath(path)
        directory = os.path.dirname(self.path)
        check_directory_path(directory, "cannot write")
        self._made_directories = _missing_directories(directory)
        os.makedirs(directory, exist_ok=True)
        remove_stale_partials(directory)
        while True:
            handle, self._temp_path = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".ckpt", dir=directory)
            fcntl.flock(handle, fcntl.LOCK_EX)
            if os.fstat(handle).st_nlink:  # still there: from now on any cleaner sees it locked
                break
            os.close(handle)  # another writer's clean-up took it between mkstemp and flock
        self._file = os.fdopen(handle, "wb")
        self.bytes_written = 0

    def write(self, name, array, dtype=None):
        """Append `array` under `name`, cast to `dtype` ("float16", "bfloat16", "float32", or None: keep)."""
        if dtype == "bfloat16":
            content, type_name = _float_to_bfloat16_bits(array), "BFloat16"
        else:
            content = np.ascontiguousarray(array, dtype=np.dtype(dtype) if dtype else None)
            type_name = _CKPT_TYPE_OF_NUMPY[content.dtype]
        flat = content.reshape(-1)
        step = max(1, _SLICE_BYTES // max(1, flat.itemsize))
        for start in range(0, max(flat.size, 1), step):
            piece = flat[start:start + step]
            header = _record_header(name, array.shape, type_name, piece.nbytes)
            self._file.write(header)
            self._file.write(memoryview(piece).cast("B"))
            self.bytes_written += len(header) + piece.nbytes

    def close(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        # mkstemp creates the file owner-only; give it the permissions of any other file written here.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._temp_path, 0o666 & ~umask)
        os.replace(self._temp_path, self.path)
        self._file.close()  # releases the lock, after the rename: a cleaner never sees an unlocked partial

    def abort(self):
        self._file.close()
        if os.path.exists(self._temp_path):
            os.remove(self._temp_path)
        for directory in self._made_directories:  # deepest first; only those left empty
            with contextlib.suppress(OSError):
                os.rmdir(directory)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _read_varint(stream):
    result, shift = 0, 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise EOFError
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def _decode_tensor(tensor, chunks, path, name):
    type_name = tensor.tensor_type
    dtype = np.dtype(np.uint16 if type_name == "BFloat16" else _NUMPY_OF_CKPT_TYPE.get(type_name, np.void))
    if dtype == np.void:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported type {type_name!r}")
    content = b"".join(chunks)
    shape = tuple(tensor.dims)
    count = math.prod(shape)  # exact: numpy's product of corrupt dims could overflow into a plausible size
    if min(shape, default=0) < 0 or len(content) != count * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} holds {len(content)} bytes, its shape {shape} of {type_name} "
                              f"needs {max(count, 0) * dtype.itemsize}: the file is truncated or corrupt")
    array = np.frombuffer(content, dtype).reshape(shape)
    return _bfloat16_bits_to_float(array) if type_name == "BFloat16" else array


def iter_checkpoint(path):
    """Yield (name, numpy array) from a MindSpore `.ckpt`, one tensor in memory at a time.

    bfloat16 tensors come back as float32 (numpy has no bfloat16).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    pending_name, pending_tensor, chunks = None, None, []
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        while True:
            key = stream.read(1)
            if not key or key == b"c":  # end, or MindSpore's optional trailing "crc_num" footer
                break
            try:
                if key != b"\x0a":
                    raise EOFError
                length = _read_varint(stream)
                if length > size - stream.tell():  # refused before a buffer of that length is made
                    raise EOFError
                payload = stream.read(length)
                if len(payload) != length:
                    raise EOFError
                record = Checkpoint()
                record.ParseFromString(b"\x0a" + _encode_varint(length) + payload)
            except Exception as error:
                raise CheckpointError(f"{path} is not a readable MindSpore checkpoint "
                                      f"(corrupt or truncated near byte {stream.tell()})") from error
            value = record.value[0]
            if value.tag != pending_name:
                if pending_name is not None:
                    yield pending_name, _decode_tensor(pending_tensor, chunks, path, pending_name)
                pending_name, pending_tensor, chunks = value.tag, value.tensor, []
            chunks.append(value.tensor.tensor_content)
    if pending_name is not None:
        yield pending_name, _decode_tensor(pending_tensor, chunks, path, pending_name)


def _encode_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def check_tensor(name, shape, layout, source):
    """Raise a CheckpointError naming `name` if it is not in `layout` or has the wrong shape."""
    if name not in layout:
        raise CheckpointError(f"{source}: unexpected tensor {name!r}: the model has no such parameter")
    if tuple(shape) != tuple(layout[name]):
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(shape)}, "
                              f"the model config expects {tuple(layout[name])}")


def check_complete(seen, layout, source):
    missing = [name for name in layout if name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}")


def resolve_checkpoint_file(path):
    """A `.ckpt` file, or a directory holding exactly one (the layout MindFormers writes)."""
    if os.path.isdir(path):  # a writer's partial file is not a checkpoint
        files = sorted(name for name in os.listdir(path) if name.endswith(".ckpt") and
                       not name.startswith(PARTIAL_PREFIX))
        if len(files) != 1:
            raise CheckpointError(f"{path}: expected one .ckpt file in the directory, found {len(files)}"
                                  + (f" ({', '.join(files)})" if files else ""))
        return os.path.join(path, files[0])
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint_into(model, path):
    """Load a LLaVA `.ckpt` (file, or directory holding one) into `model`, one tensor at a time."""
    path = resolve_checkpoint_file(path)
    load_tensors_into(model, iter_checkpoint(path), path)
    return path


def load_tensors_into(model, tensors, source):
    """Set `model`'s parameters from (name, numpy array) pairs, checking every name and shape.

    Raises CheckpointError naming the first unexpected, mis-shaped or missing tensor of `source`. Values are
    cast to each parameter's dtype (a float16 checkpoint loads into a float32 CPU model and back).
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    parameters = model.weights()
    layout = {name: tuple(param.shape) for name, param in parameters.items()}
    seen = set()
    for name, array in tensors:
        check_tensor(name, array.shape, layout, source)
        parameter = parameters[name]
        # In place: graphs compiled before this load (set_data would swap the buffer under them) see it too.
        ms.ops.assign(parameter, ms.Tensor(array).astype(parameter.dtype))
        seen.add(name)
    check_complete(seen, layout, source)
