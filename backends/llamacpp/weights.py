"""GGUF weights in another compute format for llama.cpp: converted once, cached, written atomically.

llama.cpp multiplies quantized weights by activations that it quantizes too (Q4_1 x Q8_1), and
which kernel runs depends on the CPU. A small model such as the bundled SmolLM2-135M is close
enough to its decision boundaries that those kernels change its greedy answers from one x86-64
host to the next. The same stored values expanded to F16 go through llama.cpp's float kernels
and answer alike everywhere, a little slower. The conversion reads each tensor's stored values
(``gguf.quants.dequantize``), so nothing is re-learned or re-quantized: F32 holds them exactly,
F16 rounds them to 11 significant bits.

The converted file is named after the source's SHA-256 and records it, with its own size, in its
first metadata fields, so a changed source is converted again, a cached file is never served for
the wrong source or cut short, and checking the cache reads a few hundred bytes (parsing the whole
header with ``GGUFReader``, vocabulary included, takes seconds).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backends.base import WeightsProgress
from backends.config import ComputeFormat

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, ReaderTensor

# F16 serves the embedded default; bench/ measures every format. Q8_0 re-quantizes the stored
# values, so it is the one format that changes them beyond rounding.

SOURCE_SHA256_KEY = "llama_gateway.source_sha256"
FILE_BYTES_KEY = "llama_gateway.file_bytes"
# GGUF's value types for the fields this module writes first (gguf.GGUFValueType.STRING, UINT64).
_STRING, _UINT64 = 8, 10
# general.architecture, then the two fields above.
_LEADING_FIELDS = 3
# The writer announces each file it writes at INFO; the conversion logs one line of its own.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
_CHUNK = 1 << 20


class ConversionError(Exception):
    """The source cannot be converted (unreadable, checksum mismatch, unknown tensor type)."""


@dataclass(frozen=True, slots=True)
class ConvertedWeights:
    path: Path
    converted: bool
    """False when an earlier conversion was reused."""
    seconds: float


# What this process already read, by file identity (path, inode, size, mtime): ``serve`` checks
# the weights before uvicorn starts and the backend again when it loads, and tests start many
# backends on one file. A changed file has a new identity and is read again.
_FileIdentity = tuple[str, int, int, int]
_digests: dict[_FileIdentity, str] = {}
_recorded: dict[_FileIdentity, str | None] = {}


def _identity(path: Path) -> _FileIdentity:
    status = path.stat()
    return (str(path.resolve()), status.st_ino, status.st_size, status.st_mtime_ns)


def sha256_of(path: Path) -> str:
    identity = _identity(path)
    if (known := _digests.get(identity)) is not None:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    _digests[identity] = digest.hexdigest()
    return _digests[identity]


def converted_path(source: Path, source_sha256: str, fmt: ComputeFormat, cache_dir: Path) -> Path:
    """Where the conversion of ``source`` to ``fmt`` is cached: ``<stem>.<fmt>.<sha256[:16]>.gguf``."""
    stem = source.name.removesuffix(".gguf")
    return cache_dir / f"{stem}.{fmt}.{source_sha256[:16]}.gguf"


def recorded_source_sha256(path: Path) -> str | None:
    """The source checksum a complete converted file records; None for any other or damaged file."""
    try:
        identity = _identity(path)
    except OSError:
        return None
    if identity not in _recorded:
        _recorded[identity] = _read_recorded_source_sha256(path)
    return _recorded[identity]


def _read_recorded_source_sha256(path: Path) -> str | None:
    fields = {key: value for key, (_, value) in _leading_fields(path).items()}
    sha256 = fields.get(SOURCE_SHA256_KEY)
    if not isinstance(sha256, str) or fields.get(FILE_BYTES_KEY) != path.stat().st_size:
        return None
    return sha256


def _leading_fields(path: Path) -> dict[str, tuple[int, str | int]]:
    """The first metadata fields of a little-endian GGUF that hold a string or a uint64: by key,
    the value's offset in the file and the value. Empty for anything else."""
    fields: dict[str, tuple[int, str | int]] = {}
    try:
        with path.open("rb") as file:
            head = file.read(64 << 10)
        magic, _version, _tensors, count = struct.unpack_from("<4sIQQ", head)
        if magic != b"GGUF":
            return fields
        offset = 24
        for _ in range(min(count, _LEADING_FIELDS)):
            (length,) = struct.unpack_from("<Q", head, offset)
            key = head[offset + 8 : offset + 8 + length].decode("utf-8")
            (value_type,) = struct.unpack_from("<I", head, offset + 8 + length)
            offset += 12 + length
            if value_type == _UINT64:
                fields[key] = (offset, struct.unpack_from("<Q", head, offset)[0])
                offset += 8
            elif value_type == _STRING:
                (length,) = struct.unpack_from("<Q", head, offset)
                fields[key] = (offset, head[offset + 8 : offset + 8 + length].decode("utf-8"))
                offset += 8 + length
            else:
                break
    except (OSError, struct.error, UnicodeDecodeError):
        return {}
    return fields


def ensure_converted(
    source: Path,
    fmt: ComputeFormat,
    cache_dir: Path,
    *,
    expected_sha256: str | None = None,
    progress: WeightsProgress | None = None,
) -> ConvertedWeights:
    """The cached conversion of ``source`` to ``fmt``, converting first when there is none.

    ``expected_sha256`` (when the source is a known file, such as the bundled model) is checked
    before anything is read as weights.
    """
    started = time.monotonic()
    try:
        source_sha256 = sha256_of(source)
    except OSError as exc:
        raise ConversionError(f"cannot read {source}: {exc.strerror}") from exc
    if expected_sha256 is not None and source_sha256 != expected_sha256:
        raise ConversionError(
            f"{source} has SHA-256 {source_sha256}, not the {expected_sha256} it should have; reinstall the package"
        )
    target = converted_path(source, source_sha256, fmt, cache_dir)
    if recorded_source_sha256(target) == source_sha256:
        return ConvertedWeights(target, converted=False, seconds=time.monotonic() - started)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"cannot create the data directory {cache_dir}: {exc.strerror}") from exc
    try:
        _convert_atomically(source, target, fmt, source_sha256, progress)
    except OSError as exc:  # a full disk, a read-only directory: nothing half-written is left behind
        raise ConversionError(
            f"cannot write converted weights into {cache_dir}: {exc.strerror or exc}; "
            "free some space or point data_dir (LLAMA_GATEWAY_DATA_DIR) elsewhere"
        ) from exc
    return ConvertedWeights(target, converted=True, seconds=time.monotonic() - started)


def _convert_atomically(
    source: Path, target: Path, fmt: ComputeFormat, source_sha256: str, progress: WeightsProgress | None
) -> None:
    # A temporary file beside the target, renamed over it only once complete and on disk: a crash
    # leaves at most a stray temporary file (never read), and concurrent starts both succeed.
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        _convert(source, Path(temporary), fmt, source_sha256, progress)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


_TARGET_TYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32", "q8_0": "Q8_0"}
_FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "f32": "ALL_F32", "q8_0": "MOSTLY_Q8_0"}


def _convert(
    source: Path, target: Path, fmt: ComputeFormat, source_sha256: str, progress: WeightsProgress | None
) -> None:
    import gguf

    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{source} is not a readable GGUF file: {exc}") from exc
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ConversionError(f"{source} names no architecture")
    writer = gguf.GGUFWriter(target, arch=str(arch_field.contents()), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    # First after the architecture, where the cache check reads them; the size is filled in last.
    writer.add_string(SOURCE_SHA256_KEY, source_sha256)
    writer.add_uint64(FILE_BYTES_KEY, 0)
    file_type = int(gguf.LlamaFileType[_FILE_TYPES[fmt]])
    for field in reader.fields.values():
        # GGUF.* fields are the header itself; the architecture is written by the writer.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)

    planned = [(tensor, _target_type(tensor.data.ndim, fmt)) for tensor in reader.tensors]
    for tensor, target_type in planned:
        shape = _element_shape(tensor)
        row_bytes = _row_bytes(target_type, shape[-1])
        dtype = _numpy_dtype(target_type)
        # The writer takes quantized tensors' shapes in bytes per row, float ones in elements.
        info_shape = (*shape[:-1], row_bytes) if dtype == np.uint8 else shape
        nbytes = row_bytes * int(np.prod(shape[:-1], dtype=np.int64))
        writer.add_tensor_info(tensor.name, info_shape, dtype, nbytes, raw_dtype=target_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(int(tensor.n_bytes) for tensor in reader.tensors)
    done = 0
    for tensor, target_type in planned:
        writer.write_tensor_data(_converted_data(tensor, target_type), tensor_endianess=reader.endianess)
        done += int(tensor.n_bytes)
        if progress is not None:
            progress(done, total)
    writer.close()
    size_offset, _ = _leading_fields(target)[FILE_BYTES_KEY]
    with target.open("r+b") as file:
        file.seek(size_offset)
        file.write(struct.pack("<Q", target.stat().st_size))


def _target_type(ndim: int, fmt: ComputeFormat) -> GGMLQuantizationType:
    """Matrices go to ``fmt``; vectors (norms, biases) to F32, as llama.cpp's converter keeps them."""
    from gguf import GGMLQuantizationType

    if ndim <= 1:
        return GGMLQuantizationType.F32
    return GGMLQuantizationType[_TARGET_TYPES[fmt]]


def _element_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The tensor's shape in elements, numpy order (GGUF stores it reversed, in ggml order)."""
    return tuple(int(n) for n in reversed(tensor.shape))


def _row_bytes(target_type: GGMLQuantizationType, row_elements: int) -> int:
    from gguf import GGML_QUANT_SIZES

    block_size, type_size = GGML_QUANT_SIZES[target_type]
    return row_elements // block_size * type_size


def _numpy_dtype(target_type: GGMLQuantizationType) -> np.dtype[np.generic]:
    from gguf import GGMLQuantizationType

    if target_type == GGMLQuantizationType.F32:
        return np.dtype(np.float32)
    if target_type == GGMLQuantizationType.F16:
        return np.dtype(np.float16)
    return np.dtype(np.uint8)


def _converted_data(
    tensor: ReaderTensor, target_type: GGMLQuantizationType
) -> np.ndarray[tuple[int, ...], np.dtype[np.generic]]:
    from gguf import GGMLQuantizationType, quants

    values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(_element_shape(tensor))
    if target_type == GGMLQuantizationType.F32:
        return values.astype(np.float32, copy=False)
    if target_type == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    try:
        return quants.quantize(values.astype(np.float32, copy=False), target_type)
    except NotImplementedError as exc:
        raise ConversionError(f"gguf cannot write {target_type} tensors: {exc}") from exc
