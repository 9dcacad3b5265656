"""trainer_core.io: the same objects come back from .pt and .safetensors, written atomically."""

from __future__ import annotations

import collections
import dataclasses
import enum
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.trainer_core.io_helpers import SUFFIXES, assert_same, same_storage
from tests.trainer_core.io_kill_writer import make_version
from trainer_core import io
from trainer_core.io_structure import DTYPE_BY_NAME, UNSAVABLE_DTYPES

ROOT = Path(__file__).resolve().parents[2]
QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
SAVABLE_DTYPES = sorted(set(DTYPE_BY_NAME.values()) - UNSAVABLE_DTYPES - QUANTIZED, key=str)
# torch warns whenever it creates a complex32 tensor, its own loader included.
COMPLEX32_WARNING = "ignore:ComplexHalf support is experimental:UserWarning"


def round_trip(obj: object, tmp_path: Path, suffix: str) -> object:
    """Save and load without fsync: these tests are about contents, and fsync is slow on shared disks."""
    path = tmp_path / f"obj{suffix}"
    io.save(obj, path, fsync=False)
    return io.load(path)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (bool gets 0/1), so every dtype, float8 included, is covered."""
    g = torch.Generator().manual_seed(seed)
    numel = int(torch.Size(shape).numel())
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


# --------------------------------------------------------------------------- round trips

TENSOR_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int64,
                 torch.bool, torch.complex64, torch.float8_e4m3fn]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    t = random_tensor(draw(st.sampled_from(TENSOR_DTYPES)), shape, draw(st.integers(0, 2**16)))
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)
    if t.dim() >= 1 and t.shape[0] > 1 and draw(st.booleans()):
        t = t[1::2]
    return t


scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
           | st.binary(min_size=1, max_size=8) | st.complex_numbers(allow_nan=True))
keys = st.text(max_size=6) | st.integers(-5, 5) | st.none() | st.tuples(st.integers(0, 3), st.text(max_size=2))
nested = st.recursive(
    scalars | tensors(),
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
                   | st.dictionaries(keys, inner, max_size=4)
                   | st.dictionaries(st.text(max_size=4), inner, max_size=3).map(collections.OrderedDict)),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(obj=nested)
def test_nested_values_round_trip_identically_through_both_formats(tmp_path_factory: pytest.TempPathFactory,
                                                                   obj: object) -> None:
    folder = tmp_path_factory.mktemp("nested")
    for suffix in SUFFIXES:
        assert_same(round_trip(obj, folder, suffix), obj)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_supported_kind_of_value_comes_back_with_its_type(tmp_path: Path, suffix: str) -> None:
    obj = {
        "ints": {0: 1, -1: 2**80, True: None}, "floats": [0.1, -0.0, float("inf"), float("-inf"), float("nan")],
        "tuple": (1, (2, "x")), "set": {1, "a"}, "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"),
        "complex": 1 - 2j, "size": torch.Size([2, 3]), "view_shape": torch.Size([-1, 4]),
        "dtype": torch.bfloat16, "device": torch.device("cpu"),
        "odict": collections.OrderedDict([("b", 1), ("a", 2)]), (1, "tuple key"): "v", 2.5: "float key",
        "text": "ünïcode \n\"quoted\" \ud800", "": "empty key",
    }
    assert_same(round_trip(obj, tmp_path, suffix), obj)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tied_tensors_and_views_come_back_sharing_one_storage(tmp_path: Path, suffix: str) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"embed": base, "lm_head": base, "transposed": base.T, "rows": base[1:3], "strided": base[:, ::2],
           "flat_tail": base.view(-1)[20:], "broadcast": base[0].expand(5, 6), "scalar": base[2, 3]}
    got = round_trip(obj, tmp_path, suffix)
    assert_same(got, obj)
    assert got["embed"] is got["lm_head"]
    assert all(same_storage(got["embed"], view) for view in got.values())
    got["embed"][2, 3] = -1.0
    assert got["rows"][1, 3] == -1.0 and got["transposed"][3, 2] == -1.0 and got["scalar"] == -1.0


VIEWS = {
    "whole": lambda t: t, "transposed": lambda t: t.T, "row": lambda t: t[-1], "column": lambda t: t[:, 0],
    "strided": lambda t: t[::2, 1::2], "flat_tail": lambda t: t.reshape(-1)[3:], "element": lambda t: t[0, -1],
    "broadcast": lambda t: t[:1].expand(3, -1), "empty": lambda t: t[:0],
}


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(TENSOR_DTYPES), rows=st.integers(2, 5), cols=st.integers(2, 5),
       picks=st.lists(st.sampled_from(sorted(VIEWS)), min_size=1, max_size=5))
def test_any_set_of_views_of_one_tensor_comes_back_as_views_of_one_storage(
        tmp_path_factory: pytest.TempPathFactory, dtype: torch.dtype, rows: int, cols: int, picks: list[str]) -> None:
    base = random_tensor(dtype, (rows, cols), seed=rows * cols)
    views = [VIEWS[name](base) for name in picks]
    folder = tmp_path_factory.mktemp("views")
    for suffix in SUFFIXES:
        got = round_trip(views, folder, suffix)
        assert_same(got, views)
        nonempty = [v for v in got if v.numel()]
        assert all(same_storage(nonempty[0], v) for v in nonempty)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_unrelated_tensors_do_not_come_back_sharing(tmp_path: Path, suffix: str) -> None:
    got = round_trip({"a": torch.ones(3), "b": torch.ones(3)}, tmp_path, suffix)
    assert not same_storage(got["a"], got["b"])


@pytest.mark.filterwarnings(COMPLEX32_WARNING)
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", SAVABLE_DTYPES, ids=str)
def test_every_dtype_torch_can_save_round_trips(tmp_path: Path, suffix: str, dtype: torch.dtype) -> None:
    t = random_tensor(dtype, (3, 4), seed=7)
    obj = {"t": t, "scalar": random_tensor(dtype, (), seed=8), "empty": random_tensor(dtype, (0, 2)),
           "col": t[:, 1], "dtype": dtype}
    got = round_trip(obj, tmp_path, suffix)
    assert_same(got, obj)
    assert same_storage(got["t"], got["col"])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_parameters_and_grad_flags_survive(tmp_path: Path, suffix: str) -> None:
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    obj = {"param": torch.nn.Parameter(torch.randn(2, 2)), "frozen": frozen, "leaf": torch.randn(2, requires_grad=True)}
    got = round_trip(obj, tmp_path, suffix)
    assert_same(got, obj)
    assert type(got["param"]) is torch.nn.Parameter and got["param"].requires_grad
    assert type(got["frozen"]) is torch.nn.Parameter and not got["frozen"].requires_grad


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_conjugated_and_meta_tensors_round_trip(tmp_path: Path, suffix: str) -> None:
    z = torch.randn(3, dtype=torch.complex64)
    got = round_trip({"conj": z.conj(), "meta": torch.empty(2, 5, device="meta")}, tmp_path, suffix)
    assert torch.equal(got["conj"].resolve_conj(), z.conj().resolve_conj())
    assert got["meta"].device.type == "meta" and got["meta"].shape == (2, 5)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_adamw_state_dict_loads_into_a_fresh_optimizer_and_gives_the_identical_next_step(
        tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 4)

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.3)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    model, opt = build()
    for _ in range(3):
        step(model, opt)
    path = tmp_path / f"ckpt{suffix}"
    io.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    loaded = io.load(path)
    assert sorted(loaded["optimizer"]["state"]) == [0, 1, 2, 3]
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)

    fresh_model, fresh_opt = build()
    fresh_model.load_state_dict(loaded["model"])
    fresh_opt.load_state_dict(loaded["optimizer"])
    step(model, opt)
    step(fresh_model, fresh_opt)
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same(fresh_opt.state_dict(), opt.state_dict())


# --------------------------------------------------------------------------- refused values


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("value", "problem"), [
    (np.float32(1.0), "numpy.float32"),
    (torch.zeros(2, dtype=torch.uint8).view(torch.uint3), "cannot save dtype torch.uint3"),
    (frozenset({1}), "frozenset"),
    (collections.defaultdict(int), "defaultdict"),
    (torch.ones(2, requires_grad=True) * 2, "non-leaf"),
    (b"", "empty bytes"),
])
def test_values_neither_format_can_store_are_refused_by_path_before_writing(
        tmp_path: Path, suffix: str, value: object, problem: str) -> None:
    path = tmp_path / f"obj{suffix}"
    with pytest.raises(io.UnsupportedValueError, match=problem) as err:
        io.save({"outer": [0, {"bad": value}]}, path)
    assert str(path) in str(err.value) and "outer/1/bad" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_views_of_one_storage_with_different_dtypes_are_refused(tmp_path: Path, suffix: str) -> None:
    t = torch.zeros(4)
    with pytest.raises(io.UnsupportedValueError, match="different dtypes"):
        io.save({"f": t, "i": t.view(torch.int32)}, tmp_path / f"x{suffix}")


def test_a_self_containing_object_is_refused(tmp_path: Path) -> None:
    loop: list[object] = [1]
    loop.append(loop)
    with pytest.raises(io.UnsupportedValueError, match="contains itself"):
        io.save(loop, tmp_path / "x.safetensors")


@pytest.mark.filterwarnings("ignore:.*(quantize_per_tensor|TypedStorage|[Ss]parse).*:UserWarning")
def test_sparse_and_quantized_tensors_go_to_pt_only(tmp_path: Path) -> None:
    sparse = torch.eye(3).to_sparse()
    quantized = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    for value in (sparse, quantized):
        with pytest.raises(io.UnsupportedValueError, match=r"the \.pt format can"):
            io.save({"t": value}, tmp_path / "x.safetensors")
    got = round_trip({"s": sparse, "q": quantized}, tmp_path, ".pt")
    assert torch.equal(got["s"].to_dense(), torch.eye(3)) and torch.equal(got["q"].dequantize(), quantized.dequantize())


# --------------------------------------------------------------------------- malformed files


def sample_file(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"sample{suffix}"
    io.save({"w": torch.arange(64, dtype=torch.float32), "meta": {"step": 3, "name": "x" * 40}}, path)
    return path


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_and_truncated_files_raise_a_clear_error_naming_the_file(tmp_path: Path, suffix: str) -> None:
    data = sample_file(tmp_path, suffix).read_bytes()
    broken = tmp_path / f"broken{suffix}"
    for cut in [0, 1, 7, 8, 9, 20, len(data) // 2, len(data) - 8, len(data) - 1]:
        broken.write_bytes(data[:cut])
        with pytest.raises(io.CorruptFileError) as err:
            io.load(broken)
        assert str(broken) in str(err.value)
        if cut == 0:
            assert "is empty" in str(err.value)


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(("content", "problem"), [
    ((2**63).to_bytes(8, "little") + b"{}", "header claims"),
    ((10**9).to_bytes(8, "little") + b" " * 16, "header claims"),
    (safetensors_bytes(b"\xff" * 16), "not valid JSON"),
    (safetensors_bytes(b"[1,2,3]"), "not a JSON object"),
    (safetensors_bytes(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(8)), "truncated"),
    (safetensors_bytes(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}', bytes(12)), "do not fit"),
    (safetensors_bytes(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)), "expected 0"),
    (safetensors_bytes(b'{"a":{"dtype":"X99","shape":[1],"data_offsets":[0,4]}}', bytes(4)), "no dtype"),
    (safetensors_bytes(b'{"__metadata__":{"traindeck":"{\\"version\\":1}"}}'), "structure metadata"),
    (safetensors_bytes(b'{"__metadata__":{"traindeck":"[[[[["}}'), "structure metadata"),
    (safetensors_bytes(b'{"__metadata__":{"traindeck":5}}'), "map of strings"),
])
def test_corrupt_safetensors_headers_raise_a_clear_error(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(io.CorruptFileError, match=problem) as err:
        io.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_random_corruption_never_escapes_as_anything_but_a_clear_error(tmp_path: Path, suffix: str) -> None:
    data = bytearray(sample_file(tmp_path, suffix).read_bytes())
    rng = random.Random(5)
    path = tmp_path / f"fuzzed{suffix}"
    for _ in range(150):
        fuzzed = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            fuzzed[rng.randrange(len(fuzzed))] = rng.randrange(256)
        path.write_bytes(fuzzed)
        try:
            io.load(path)
        except (ValueError, OSError) as e:
            assert str(path) in str(e)


@pytest.mark.parametrize("wrong", [".bin", ".json", ""])
def test_an_unknown_suffix_is_refused_for_save_and_load(tmp_path: Path, wrong: str) -> None:
    path = tmp_path / f"weights{wrong}"
    with pytest.raises(io.UnsupportedSuffixError, match="unknown suffix"):
        io.save({"a": 1}, path)
    path.write_bytes(b"12345678")
    with pytest.raises(io.UnsupportedSuffixError, match=str(path)):
        io.load(path)


def test_a_file_whose_contents_do_not_match_its_suffix_is_refused(tmp_path: Path) -> None:
    pt, sft = sample_file(tmp_path, ".pt"), sample_file(tmp_path, ".safetensors")
    for src, dst in [(pt, tmp_path / "pt_in_disguise.safetensors"), (sft, tmp_path / "sft_in_disguise.pt")]:
        dst.write_bytes(src.read_bytes())
        with pytest.raises(io.CorruptFileError, match=str(dst)):
            io.load(dst)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_directories_missing_files_and_fifos_raise_os_errors_naming_the_path(tmp_path: Path, suffix: str) -> None:
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=str(folder)):
        io.load(folder)
    with pytest.raises(IsADirectoryError, match=str(folder)):
        io.save({"a": 1}, folder)
    with pytest.raises(FileNotFoundError, match="missing"):
        io.load(tmp_path / f"missing{suffix}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        io.save({"a": 1}, tmp_path / "nowhere" / f"x{suffix}")
    fifo = tmp_path / f"fifo{suffix}"
    os.mkfifo(fifo)
    with pytest.raises(io.CorruptFileError, match="not a regular file"):
        io.load(fifo)


def test_map_location_for_safetensors_must_be_a_device(tmp_path: Path) -> None:
    path = sample_file(tmp_path, ".safetensors")
    assert io.load(path, map_location=torch.device("cpu"))["meta"]["step"] == 3
    with pytest.raises(io.StorageError, match="map_location"):
        io.load(path, map_location={"cuda:0": "cpu"})


class Planted:
    """Unpickling this creates a folder: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.marker,)


def test_a_pickle_that_carries_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.ones(2), "payload": Planted(marker)}, path)
    with pytest.raises(io.UnsafeFileError, match="unsafe=True") as err:
        io.load(path)
    assert str(path) in str(err.value) and "mkdir" in str(err.value)
    assert not marker.exists()
    io.load(path, unsafe=True)  # the payload is live: trusting the file runs it
    assert marker.is_dir()


def test_a_raw_pickle_with_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "code_ran"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(io.StorageError, match=str(path)):
        io.load(path)
    assert not marker.exists()


def test_saving_an_object_that_would_need_code_to_load_is_refused(tmp_path: Path) -> None:
    with pytest.raises(io.UnsupportedValueError, match="Planted"):
        io.save({"x": Planted(tmp_path / "m")}, tmp_path / "x.pt")


# --------------------------------------------------------------------------- JSON, convert, exports


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: float
    where: Path


def test_json_write_converts_common_values_and_json_read_gives_them_back(tmp_path: Path) -> None:
    path = tmp_path / "info.json"
    io.json_write({"tensor": torch.tensor([1.5, 2.0]), "scalar": torch.tensor(3), "np": np.arange(3),
                   "np_scalar": np.float64(0.25), "path": Path("/runs/a"), "point": Point(1.0, Path("p")),
                   "color": Color.RED, "set": {3, 1}, "dtype": torch.float16, "tuple": (1, "a"), "ü": "ß"}, path)
    assert io.json_read(path) == {"tensor": [1.5, 2.0], "scalar": 3, "np": [0, 1, 2], "np_scalar": 0.25,
                                  "path": "/runs/a", "point": {"x": 1.0, "where": "p"}, "color": "red",
                                  "set": [1, 3], "dtype": "torch.float16", "tuple": [1, "a"], "ü": "ß"}
    assert "\n " not in path.read_text()
    io.json_write([1, {"a": 2}], path, pretty=True)
    assert "\n  " in path.read_text() and io.json_read(path) == [1, {"a": 2}]


def test_json_read_gives_the_default_only_for_a_missing_file(tmp_path: Path) -> None:
    assert io.json_read(tmp_path / "missing.json") is None
    assert io.json_read(tmp_path / "missing.json", default={"a": 1}) == {"a": 1}
    for text, problem in [("", "is empty"), ('{"a": ', "not valid JSON"), ("\xff", "not valid JSON")]:
        (tmp_path / "bad.json").write_text(text, encoding="latin-1")
        with pytest.raises(io.CorruptFileError, match=problem):
            io.json_read(tmp_path / "bad.json")
    with pytest.raises(IsADirectoryError):
        io.json_read(tmp_path)


def test_json_write_refuses_what_json_cannot_hold_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    io.json_write({"ok": 1}, path)
    with pytest.raises(io.UnsupportedValueError, match=f"{path}.*object is not JSON serialisable"):
        io.json_write({"bad": object()}, path)
    assert io.json_read(path) == {"ok": 1}


@pytest.mark.parametrize(("first", "second"), [(".pt", ".safetensors"), (".safetensors", ".pth"), (".pt", ".sft")])
def test_convert_rewrites_a_file_in_the_other_format_with_identical_contents(
        tmp_path: Path, first: str, second: str) -> None:
    obj = make_version(3)
    io.save(obj, tmp_path / f"a{first}")
    io.convert(tmp_path / f"a{first}", tmp_path / f"b{second}")
    io.convert(tmp_path / f"b{second}", tmp_path / f"c{first}")
    for name in (f"b{second}", f"c{first}"):
        got = io.load(tmp_path / name)
        assert_same(got, obj)
        assert same_storage(got["weights"], got["view"])


def test_save_weights_exports_metadata_for_other_readers(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "export.safetensors"
    weights = {"embed.weight": torch.randn(4, 2), "head.bias": torch.zeros(2)}
    io.save_weights(weights, path, metadata={"step": "120", "config": '{"lr": 0.1}'})
    with safe_open(path, "pt") as f:
        assert f.metadata()["step"] == "120"
        assert sorted(f.keys()) == sorted(weights)
    assert io.read_metadata(path) == {"format": "pt", "step": "120", "config": '{"lr": 0.1}'}
    assert_same(io.load(path), weights)
    with pytest.raises(io.UnsupportedValueError, match=r"only \.safetensors"):
        io.save_weights(weights, tmp_path / "export.pt", metadata={"step": "1"})
    with pytest.raises(io.UnsupportedValueError, match="str to str"):
        io.save_weights(weights, path, metadata={"step": 1})  # type: ignore[dict-item]
