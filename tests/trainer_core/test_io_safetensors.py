"""The safetensors files trainer_core.io writes are the library's own format, read without copying."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from tests.trainer_core.io_helpers import assert_same, same_storage
from trainer_core import io


def header_of(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n])


def one_of_each_dtype() -> dict[str, torch.Tensor]:
    """A tensor per safetensors dtype, named against the dtype order so the sort is really exercised."""
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.float8_e8m0fnu,
              torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.int16, torch.uint16, torch.float16,
              torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.complex64, torch.float64,
              torch.int64, torch.uint64]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(dtypes):
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (3 * dtype.itemsize,), dtype=torch.uint8, generator=g)
        tensors[f"{chr(ord('a') + i)}.{dtype}"] = raw.view(dtype)
    tensors["z.second_float"] = torch.randn(2, 3, generator=g)
    tensors["scalar"] = torch.tensor(0.5)
    tensors["empty"] = torch.zeros(0, 4)
    return tensors


def test_a_flat_state_dict_file_is_byte_for_byte_what_the_library_writes(tmp_path: Path) -> None:
    tensors = one_of_each_dtype()
    path = tmp_path / "flat.safetensors"
    io.save(tensors, path)
    ours = path.read_bytes()
    metadata = header_of(ours)[1]["__metadata__"]
    # The library keeps metadata in a hash map, so its key order varies from call to call.
    attempts = [safetensors.torch.save(tensors, metadata=metadata) for _ in range(40)]
    assert ours in attempts
    assert list(header_of(ours)[1]) == list(header_of(attempts[0])[1])


def test_plain_readers_see_each_storage_once_under_its_own_name_and_shape(tmp_path: Path) -> None:
    embed = torch.randn(5, 3)
    obj = {"model": {"embed.weight": embed, "head.weight": embed, "proj.weight": torch.randn(3, 3).T},
           "step": 7, "rows": embed[1:3]}
    path = tmp_path / "model.safetensors"
    io.save(obj, path)
    plain = safetensors.torch.load_file(path)
    assert sorted(plain) == ["model.embed.weight", "model.proj.weight"]
    assert torch.equal(plain["model.embed.weight"], embed)
    assert plain["model.proj.weight"].shape == (9,)  # a transposed view keeps its storage's layout
    with safe_open(path, "pt") as f:
        assert set(f.metadata()) == {"format", "traindeck"}
    got = io.load(path)
    assert_same(got, obj)
    assert got["model"]["embed.weight"] is got["model"]["head.weight"]
    assert same_storage(got["rows"], got["model"]["embed.weight"])


def test_files_written_by_the_library_load_as_plain_dicts_in_file_order(tmp_path: Path) -> None:
    tensors = one_of_each_dtype()
    path = tmp_path / "library.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"origin": "library"})
    got = io.load(path)
    want = safetensors.torch.load_file(path)
    assert list(got) == list(want)
    assert_same(got, want)
    assert io.read_metadata(path) == {"origin": "library"}


def test_loaded_tensors_are_plain_enough_for_the_library_to_save_again(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    io.save({"w": torch.randn(4, 4), "b": torch.randn(4)}, path)
    safetensors.torch.save_file(io.load(path), tmp_path / "b.safetensors")
    assert_same(safetensors.torch.load_file(tmp_path / "b.safetensors"), safetensors.torch.load_file(path))


def test_every_tensor_starts_aligned_to_its_dtype_after_a_padded_header(tmp_path: Path) -> None:
    path = tmp_path / "aligned.safetensors"
    tensors = one_of_each_dtype()
    io.save({**tensors, "c128": torch.randn(3, dtype=torch.complex128), "odd": torch.ones(3, dtype=torch.int8)}, path)
    n, header = header_of(path.read_bytes())
    assert n % 8 == 0
    sizes = {"U64": 8, "I64": 8, "F64": 8, "C64": 8, "F32": 4, "U32": 4, "I32": 4, "BF16": 2, "F16": 2, "U16": 2,
             "I16": 2}
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % sizes.get(info["dtype"], 1) == 0, name


def test_dtypes_the_library_lacks_are_stored_as_same_width_arrays(tmp_path: Path) -> None:
    z = torch.randn(2, 3, dtype=torch.complex128)
    bits = torch.arange(6, dtype=torch.int16).view(torch.bits16)
    path = tmp_path / "odd.safetensors"
    io.save({"z": z, "bits": bits}, path)
    plain = safetensors.torch.load_file(path)
    assert torch.equal(plain["z"], torch.view_as_real(z))
    assert plain["bits"].dtype == torch.uint16
    got = io.load(path)
    assert got["z"].dtype == torch.complex128 and torch.equal(got["z"], z)
    assert got["bits"].dtype == torch.bits16


def test_a_small_view_of_a_large_tensor_stores_only_the_bytes_it_uses(tmp_path: Path) -> None:
    big = torch.randn(1_000_000)
    path = tmp_path / "slice.safetensors"
    io.save({"part": big[1000:1010]}, path)
    assert path.stat().st_size < 4096
    assert torch.equal(io.load(path)["part"], big[1000:1010])


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read resident memory")
def test_loading_maps_the_file_instead_of_reading_it_and_writes_stay_private(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    io.save({"w": torch.ones(16 << 20)}, path, fsync=False)  # 64 MiB
    before = resident_bytes()
    got = io.load(path)
    assert resident_bytes() - before < 16 << 20
    got["w"][:10] = 5.0
    assert io.load(path)["w"][:10].eq(1.0).all()
