"""Converting GGUF weights for llama.cpp: exact values, cached once, atomic, tied to the source's checksum."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, Keys, LlamaFileType, quants

from backends.llamacpp.weights import (
    SOURCE_SHA256_KEY,
    ConversionError,
    converted_path,
    ensure_converted,
    recorded_source_sha256,
    sha256_of,
)
from gateway.settings import EMBEDDED_GGUF_SHA256, embedded_model_path
from tests.support.embedded import embedded_f16_path, shared_data_dir


@pytest.fixture(scope="module")
def source() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedded_f16_path(shared_data_dir(tmp_path_factory))


def test_the_bundled_file_is_the_one_pinned(source: Path) -> None:
    assert sha256_of(source) == hashlib.sha256(source.read_bytes()).hexdigest() == EMBEDDED_GGUF_SHA256


def test_f16_holds_the_stored_values_rounded_to_f16(source: Path, f16: Path) -> None:
    original = GGUFReader(source)
    converted = GGUFReader(f16)
    by_name = {tensor.name: tensor for tensor in converted.tensors}
    assert [t.name for t in converted.tensors] == [t.name for t in original.tensors]
    quantized = [t for t in original.tensors if t.tensor_type not in (GGMLQuantizationType.F32,)]
    assert {t.tensor_type for t in quantized} >= {GGMLQuantizationType.Q4_1}
    for tensor in original.tensors:
        out = by_name[tensor.name]
        assert list(out.shape) == list(tensor.shape)
        expected = quants.dequantize(tensor.data, tensor.tensor_type)
        if tensor.data.ndim <= 1 or tensor.tensor_type == GGMLQuantizationType.F32:
            assert out.tensor_type == GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(out.data).reshape(expected.shape), expected)
        else:
            assert out.tensor_type == GGMLQuantizationType.F16
            np.testing.assert_array_equal(np.asarray(out.data).reshape(expected.shape), expected.astype(np.float16))


def test_metadata_is_copied_with_the_new_file_type_and_source(source: Path, f16: Path) -> None:
    original = GGUFReader(source)
    converted = GGUFReader(f16)
    for name, field in original.fields.items():
        if name.startswith("GGUF.") or name == Keys.General.FILE_TYPE:
            continue
        assert converted.fields[name].contents() == field.contents(), name
    assert converted.fields[Keys.General.FILE_TYPE].contents() == LlamaFileType.MOSTLY_F16
    assert converted.fields[SOURCE_SHA256_KEY].contents() == EMBEDDED_GGUF_SHA256
    assert recorded_source_sha256(f16) == EMBEDDED_GGUF_SHA256
    assert recorded_source_sha256(source) is None


def test_a_cached_conversion_is_reused(source: Path, f16: Path) -> None:
    before = f16.stat().st_mtime_ns
    again = ensure_converted(source, "f16", f16.parent, expected_sha256=EMBEDDED_GGUF_SHA256)
    assert again.path == f16
    assert not again.converted
    assert f16.stat().st_mtime_ns == before


def test_the_cache_is_named_after_the_source_checksum(source: Path, tmp_path: Path) -> None:
    path = converted_path(source, EMBEDDED_GGUF_SHA256, "f16", tmp_path)
    assert path == tmp_path / f"SmolLM2-135M-Instruct.Q4_1.f16.{EMBEDDED_GGUF_SHA256[:16]}.gguf"


def test_a_checksum_mismatch_is_refused_before_anything_is_written(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="reinstall"):
        ensure_converted(source, "f16", tmp_path / "cache", expected_sha256="0" * 64)
    assert not (tmp_path / "cache").exists()


def test_a_crash_mid_way_leaves_no_file(source: Path, tmp_path: Path) -> None:
    class Crash(Exception):
        pass

    def crash_half_way(done: int, total: int) -> None:
        if done > total // 2:
            raise Crash

    with pytest.raises(Crash):
        ensure_converted(source, "f16", tmp_path, progress=crash_half_way)
    assert list(tmp_path.iterdir()) == []


def test_a_file_left_at_the_cache_path_by_something_else_is_replaced(source: Path, f16: Path, tmp_path: Path) -> None:
    # A truncated file under the final name (a copy cut short by a full disk, say) is never served.
    target = tmp_path / f16.name
    target.write_bytes(f16.read_bytes()[: 1 << 16])
    result = ensure_converted(source, "f16", tmp_path, progress=None)
    assert result.converted
    assert result.path == target
    assert recorded_source_sha256(target) == EMBEDDED_GGUF_SHA256
    assert target.stat().st_size == f16.stat().st_size


def test_a_changed_source_converts_anew(source: Path, tmp_path: Path) -> None:
    copy = tmp_path / source.name
    shutil.copyfile(source, copy)
    with copy.open("r+b") as file:  # change one byte of the last tensor's data
        file.seek(-1, 2)
        last = file.read(1)
        file.seek(-1, 2)
        file.write(bytes([last[0] ^ 1]))
    changed = ensure_converted(copy, "f16", tmp_path / "cache")
    assert changed.converted
    assert changed.path.name != converted_path(source, EMBEDDED_GGUF_SHA256, "f16", tmp_path).name
    assert recorded_source_sha256(changed.path) == sha256_of(copy)


def test_an_unreadable_source_is_one_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        ensure_converted(bogus, "f16", tmp_path / "cache")
    with pytest.raises(ConversionError, match="cannot read"):
        ensure_converted(tmp_path / "missing.gguf", "f16", tmp_path / "cache")


def test_a_file_cut_short_after_its_header_is_not_reused(source: Path, f16: Path, tmp_path: Path) -> None:
    target = tmp_path / f16.name
    target.write_bytes(f16.read_bytes()[: f16.stat().st_size - 4096])
    assert recorded_source_sha256(target) is None
    assert ensure_converted(source, "f16", tmp_path).converted


def test_a_failed_write_is_one_error_and_leaves_no_file(source: Path, tmp_path: Path) -> None:
    def disk_full(done: int, total: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(ConversionError, match="No space left on device; free some space or point data_dir"):
        ensure_converted(source, "f16", tmp_path, progress=disk_full)
    assert list(tmp_path.iterdir()) == []


def test_a_data_directory_that_is_a_file_is_one_error(source: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(ConversionError, match="cannot create the data directory"):
        ensure_converted(source, "f16", blocker / "weights")
