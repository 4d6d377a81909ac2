"""Checkpoint files, read and written one tensor at a time: MindSpore's `.ckpt` and safetensors.

A MindSpore `.ckpt` is a protobuf `Checkpoint { repeated Value value = 1; }`. Concatenated serialized
`Checkpoint` messages parse as one (repeated fields append), and MindSpore itself writes large tensors as
several consecutive `Value`s with the same tag. So a writer can append tensor after tensor, and a reader can
walk the file record by record: neither needs more than one tensor in memory, which keeps a 7B conversion
(14 GB of fp16) and a sharded load far below the machine's RAM. Files written here load with
`mindspore.load_checkpoint` too.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and the raw
tensor bytes. Its header is checked by the `safetensors` package (which refuses truncated files, bad or
overlapping byte ranges); the bytes are then read with plain file reads, bfloat16 included (the package's numpy
reader has no bfloat16).

Files written by llava-ms carry a metadata record: the layout version of llava_layout.py and the model's
architecture (llava_config.architecture), so a checkpoint says what it holds. What each tensor holds and in
which order it is stored: llava_layout.py.
"""
import contextlib
import fcntl
import glob
import json
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


# The name of the metadata: a uint8 record of JSON as a `.ckpt`'s first tensor, a key of a safetensors header's
# `__metadata__`.
METADATA_NAME = "__llava__"


# Values rounded to bfloat16 per slice: whole-tensor float32/uint32 temporaries would be several times the
# size of a 7B embedding (263 MB in float16) and dominate a conversion's peak memory.
_BFLOAT16_SLICE = 1 << 22


def float_to_bfloat16_bits(array):
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


PARTIAL_PREFIX = ".partial-"  # a writer's file until it is complete; never a checkpoint to load


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
    for path in glob.glob(os.path.join(glob.escape(directory), PARTIAL_PREFIX + "*")):
        with contextlib.suppress(OSError), open(path, "rb") as stale:
            fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its writer is alive
            os.remove(path)


class _AtomicFile:
    """A file that appears at `path` only when closed cleanly. Use as a context manager: on an exception the
    temporary file is removed and nothing is left at `path`, nor the directories made for it. The temporary file
    (`.partial-*` next to `path`) is locked while it is written; partial files that no writer holds (left by
    `kill -9`) are removed when the next writer starts there."""

    def __init__(self, path, suffix):
        self.path = os.path.abspath(path)
        directory = os.path.dirname(self.path)
        check_directory_path(directory, "cannot write")
        self._made_directories = _missing_directories(directory)
        os.makedirs(directory, exist_ok=True)
        remove_stale_partials(directory)
        while True:
            handle, self._temp_path = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=suffix, dir=directory)
            fcntl.flock(handle, fcntl.LOCK_EX)
            if os.fstat(handle).st_nlink:  # still there: from now on any cleaner sees it locked
                break
            os.close(handle)  # another writer's clean-up took it between mkstemp and flock
        self._file = os.fdopen(handle, "wb")
        self.bytes_written = 0

    def _write(self, data):
        self._file.write(data)
        self.bytes_written += len(memoryview(data).cast("B"))

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


def _stored(array, dtype):
    """(contiguous content, dtype name) of `array` cast to `dtype` ("float16", "bfloat16", "float32" or None:
    keep); bfloat16 content is its uint16 bit patterns."""
    if dtype == "bfloat16":
        return float_to_bfloat16_bits(array), "bfloat16"
    content = np.ascontiguousarray(array, dtype=np.dtype(dtype) if dtype else None)
    return content, content.dtype.name


class CheckpointWriter(_AtomicFile):
    """Appends tensors to a MindSpore `.ckpt` one at a time; `metadata` (a dict) is written first."""

    def __init__(self, path, metadata=None):
        super().__init__(path, ".ckpt")
        if metadata is not None:
            self.write(METADATA_NAME, np.frombuffer(json.dumps(metadata).encode(), np.uint8))

    def write(self, name, array, dtype=None):
        """Append `array` under `name`, cast to `dtype` ("float16", "bfloat16", "float32", or None: keep)."""
        content, dtype_name = _stored(array, dtype)
        type_name = "BFloat16" if dtype_name == "bfloat16" else _CKPT_TYPE_OF_NUMPY[content.dtype]
        flat = content.reshape(-1)
        step = max(1, _SLICE_BYTES // max(1, flat.itemsize))
        for start in range(0, max(flat.size, 1), step):
            piece = flat[start:start + step]
            self._write(_record_header(name, array.shape, type_name, piece.nbytes))
            self._write(piece)


_SAFETENSORS_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_SAFETENSORS_NUMPY = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # BF16: its bits


class SafetensorsWriter(_AtomicFile):
    """Writes a safetensors file whose tensors are declared up front: `plan` is [(name, shape, dtype name)]
    ("float32", "float16", "bfloat16") in file order; `write` then takes them in that order."""

    def __init__(self, path, plan, metadata=None):
        super().__init__(path, ".safetensors")
        header, offset = {}, 0
        if metadata is not None:
            header["__metadata__"] = {METADATA_NAME: json.dumps(metadata)}
        for name, shape, dtype in plan:
            size = int(np.prod(shape, dtype=np.int64)) * _SAFETENSORS_NUMPY[_SAFETENSORS_TYPES[dtype]].itemsize
            header[name] = {"dtype": _SAFETENSORS_TYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the tensor bytes start 8-byte aligned
        self._write(len(encoded).to_bytes(8, "little") + encoded)
        self._plan = list(plan)
        self._next = 0

    def write(self, name, array, dtype=None):
        expected_name, shape, expected_dtype = self._plan[self._next]
        content, dtype_name = _stored(array, dtype or expected_dtype)
        if (name, tuple(array.shape), dtype_name) != (expected_name, tuple(shape), expected_dtype):
            raise ValueError(f"{self.path}: wrote {name} {tuple(array.shape)} {dtype_name}, the header says "
                             f"{expected_name} {tuple(shape)} {expected_dtype} comes next")
        self._write(content)
        self._next += 1

    def close(self):
        if self._next != len(self._plan):
            self.abort()
            raise ValueError(f"{self.path}: {len(self._plan) - self._next} declared tensors were not written")
        super().close()


class SafetensorsFile:
    """One safetensors file: its header checked by the `safetensors` package, its tensors read one at a time."""

    def __init__(self, path):
        from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel

        self.path = path
        try:
            with safe_open(path, framework="numpy") as validated:
                names = list(validated.keys())
                self.metadata = validated.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
        with open(path, "rb") as stream:  # the header the package has just accepted
            header = json.loads(stream.read(int.from_bytes(stream.read(8), "little")))
            self._data_start = stream.tell()
        self.tensors = {}  # name -> (safetensors dtype, shape, first byte, byte count), in the file's order
        for name in sorted(names, key=lambda key: header[key]["data_offsets"][0]):
            entry = header[name]
            if entry["dtype"] not in _SAFETENSORS_NUMPY:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}; only F32, F16 and BF16 "
                                      "are supported")
            begin, end = entry["data_offsets"]
            self.tensors[name] = (entry["dtype"], tuple(entry["shape"]), self._data_start + begin, end - begin)

    def llava_metadata(self):
        """The metadata llava-ms wrote into the file, or None."""
        text = self.metadata.get(METADATA_NAME)
        return None if text is None else json.loads(text)

    def _extent(self, name, rows):
        """(shape, first byte, byte count) of tensor `name`, or of its rows `rows` (a slice of axis 0)."""
        _, shape, offset, nbytes = self.tensors[name]
        if rows is None:
            return shape, offset, nbytes
        row_bytes = nbytes // shape[0]
        start, stop, _ = rows.indices(shape[0])
        return (stop - start, *shape[1:]), offset + start * row_bytes, (stop - start) * row_bytes

    def prefetch(self, name, rows=None):
        """Have the kernel start reading tensor `name` (or its rows) from disk in the background (`read`, later,
        finds it in the page cache)."""
        _, offset, nbytes = self._extent(name, rows)
        with open(self.path, "rb", buffering=0) as stream:
            os.posix_fadvise(stream.fileno(), offset, nbytes, os.POSIX_FADV_WILLNEED)

    def read(self, name, rows=None):
        """Tensor `name` as numpy (bfloat16 as its uint16 bit patterns), or only rows `rows` (a slice of axis 0,
        read alone: one contiguous range of the file)."""
        numpy_type = _SAFETENSORS_NUMPY[self.tensors[name][0]]
        shape, offset, nbytes = self._extent(name, rows)
        array = np.empty(nbytes // numpy_type.itemsize, numpy_type)
        with open(self.path, "rb", buffering=0) as stream:
            stream.seek(offset)
            view, done = memoryview(array).cast("B"), 0
            while done < nbytes:  # one read() is capped at ~2 GB on Linux
                count = stream.readinto(view[done:])
                if not count:
                    raise CheckpointError(f"{self.path}: tensor {name!r} ends early: the file is truncated")
                done += count
            # The page cache need not keep what was just copied (14 GB of shards would crowd out what is used).
            os.posix_fadvise(stream.fileno(), offset, nbytes, os.POSIX_FADV_DONTNEED)
        return array.reshape(shape)


def read_ahead(requests):
    """Yield the array of each (SafetensorsFile, name, rows) request in turn (SafetensorsFile.read), the next
    one's bytes already on their way from disk: while the caller checks and copies one tensor, the disk reads the
    next, instead of waiting for it (a cold 7B folder loaded ~10 s slower than HF's memory-mapped load without
    this; bench/RESULTS.md)."""
    requests = list(requests)
    for index, (file, name, rows) in enumerate(requests):
        if index + 1 < len(requests):
            following, following_name, following_rows = requests[index + 1]
            following.prefetch(following_name, following_rows)
        yield file.read(name, rows)


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


def _values(path):
    """Yield the `Value` of every protobuf record of a MindSpore `.ckpt` in turn (a tensor may span several)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
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
            yield record.value[0]


def _records(path):
    """Yield every (name, numpy array) of a MindSpore `.ckpt`, one tensor in memory at a time."""
    pending_name, pending_tensor, chunks = None, None, []
    for value in _values(path):
        if value.tag != pending_name:
            if pending_name is not None:
                yield pending_name, _decode_tensor(pending_tensor, chunks, path, pending_name)
            pending_name, pending_tensor, chunks = value.tag, value.tensor, []
        chunks.append(value.tensor.tensor_content)
    if pending_name is not None:
        yield pending_name, _decode_tensor(pending_tensor, chunks, path, pending_name)


def iter_checkpoint(path):
    """Yield (name, numpy array) from a MindSpore `.ckpt`, one tensor in memory at a time (llava-ms's metadata
    record left out; bfloat16 tensors come back as float32, numpy has no bfloat16)."""
    for name, array in _records(path):
        if name != METADATA_NAME:
            yield name, array


def checkpoint_metadata(path):
    """The metadata llava-ms wrote as the first record of a `.ckpt`, or None (read alone: cheap)."""
    for value in _values(path):
        if value.tag != METADATA_NAME:
            return None
        try:
            return json.loads(value.tensor.tensor_content)
        except ValueError:
            raise CheckpointError(f"{path}: its {METADATA_NAME} record is not JSON: the file is damaged") from None
    return None


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
