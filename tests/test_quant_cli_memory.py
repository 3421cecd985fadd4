"""``neuropil quantize`` holds one tensor at a time: the input is read through a
memory map and each output tensor is written as it is made
(``neuropil._safetensors_stream``). Structural checks only; the measured peak
memory of real models is in the report of the change, not here."""

from __future__ import annotations

import io
import os
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest

from neuropil import _quant_cli, _safetensors, quant
from neuropil import _safetensors_stream as stream
from neuropil.errors import ArgumentError, DTypeError, FormatError


def _model(path: Path, n: int = 8, shape: tuple[int, int] = (512, 1024)) -> Path:
    """``n`` float32 matrices of 2 MiB each (the default shape)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({f"layers.{i}.weight": rng.standard_normal(shape).astype(np.float32)
               for i in range(n)}, str(path))  # fmt: skip
    return path


def test_convert_never_holds_the_whole_output_or_a_copy_of_the_input(tmp_path):
    # numpy's allocations are traced by tracemalloc (the core's packed arrays
    # are not: see the next test). The old convert read the file whole and
    # copied each tensor out of it (twice the input: 32 MiB here); now the
    # tensors are views of a memory map and the peak is a small part of the
    # output (4.5 MiB of 8-bit codes and scales).
    src = _model(tmp_path / "in.safetensors")
    small = _model(tmp_path / "small.safetensors", n=1, shape=(4, 64))
    _quant_cli.convert(small, tmp_path / "warm.safetensors", progress=False)  # (imports)
    tracemalloc.start()
    try:
        report = _quant_cli.convert(src, tmp_path / "out.safetensors", 8, 32, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["quantized_tensors"] == 8
    assert peak < report["bytes_after"] / 2, (peak, report["bytes_after"])


def test_convert_holds_one_packed_tensor_at_a_time(tmp_path, monkeypatch):
    # Each packed tensor is written and dropped before the next is packed: the
    # old convert kept every one in a dict for save_file at the end.
    src = _model(tmp_path / "in.safetensors", shape=(64, 256))
    packed: list[weakref.ref] = []
    alive: list[int] = []
    real = _quant_cli.quantize

    def quantize(w, *args, **kwargs):
        alive.append(sum(r() is not None for r in packed))
        q = real(w, *args, **kwargs)
        packed.append(weakref.ref(q.data))  # (QuantizedWeights has no weakref slot)
        return q

    monkeypatch.setattr(_quant_cli, "quantize", quantize)
    _quant_cli.convert(src, tmp_path / "out.safetensors", progress=False)
    assert alive == [0] * 9, alive  # (the first call checks the format)


# ------------------------------------------------------------------ the streaming writer


def _tensors() -> dict:
    rng = np.random.default_rng(1)
    return {
        "a": rng.standard_normal((33, 7)).astype(np.float32),
        "b": _safetensors.BF16(np.arange(12, dtype=np.uint16).reshape(3, 4)),
        "c": np.arange(5, dtype=">i4"),  # (big-endian: stored little-endian)
        "d": np.asfortranarray(rng.standard_normal((4, 6))),  # (copied C-contiguous)
        "e": np.float16(2.5) * np.ones(()),
        "f": np.zeros((0, 3), np.int8),
    }


def _streamed(path: Path, room: int) -> None:
    with stream.writing(path, room) as w:
        for name, arr in _tensors().items():
            w.add(name, arr)
        w.finish({"k": "v"})


@pytest.mark.parametrize("room", [0, 17, 200])
def test_a_header_that_outgrows_its_room_moves_the_data_up(tmp_path, monkeypatch, room):
    # The room reserved is an upper bound where convert computes it; a smaller
    # one still gives the file _safetensors.write writes (the data moved up,
    # chunk by chunk from the end: small chunks here, overlapping their target).
    monkeypatch.setattr(stream, "_COPY_CHUNK", 24)
    whole = tmp_path / "whole.safetensors"
    _safetensors.write(whole, _tensors(), {"k": "v"})
    _streamed(tmp_path / "s.safetensors", room)
    assert (tmp_path / "s.safetensors").read_bytes() == whole.read_bytes()


def test_room_to_spare_pads_the_header_with_spaces(tmp_path):
    from safetensors import safe_open

    whole = tmp_path / "whole.safetensors"
    _safetensors.write(whole, _tensors(), {"k": "v"})
    path = tmp_path / "s.safetensors"
    _streamed(path, 1001)
    blob, want = path.read_bytes(), whole.read_bytes()
    n, m = int.from_bytes(blob[:8], "little"), int.from_bytes(want[:8], "little")
    assert n == 1008 and blob[8 + n :] == want[8 + m :]  # (rounded up to 8: aligned)
    assert blob[8 : 8 + n] == want[8 : 8 + m] + b" " * (n - m)
    tensors, meta, _ = _safetensors.read(path)
    assert meta == {"k": "v"} and list(tensors) == list(_tensors())
    with safe_open(str(path), "np") as f:
        np.testing.assert_array_equal(f.get_tensor("c"), np.arange(5, dtype=np.int32))


def test_a_stream_gets_the_bytes_write_writes_in_order(tmp_path):
    # (stdout: written in order, even where it could seek)
    whole = tmp_path / "whole.safetensors"
    _safetensors.write(whole, _tensors(), {"k": "v"})
    out = io.BytesIO()
    out.write(b"before")
    with stream.writing_stream(out) as w:
        for name, arr in _tensors().items():
            w.add(name, arr)
        w.finish({"k": "v"})
    assert out.getvalue() == b"before" + whole.read_bytes()


def test_the_writer_refuses_a_name_twice_and_an_unfinished_file(tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(ArgumentError, match=r"must be distinct.*'a' again"):
        with stream.writing(path, 100) as w:
            w.add("a", np.ones(3))
            w.add("a", np.ones(3))
    with pytest.raises(RuntimeError, match=r"without Writer\.finish"):
        with stream.writing(path, 100) as w:
            w.add("a", np.ones(3))
    with pytest.raises(DTypeError, match=r"a dtype safetensors stores .*; got complex128"):
        with stream.writing(path, 100) as w:
            w.add("z", np.ones(3, complex))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["s.safetensors"]


def test_entry_room_bounds_any_entry():
    for name, shape in [("x", ()), ("名前.weight", (2**63 - 1, 1)), ('q"\\', (1, 2, 3))]:
        entry = {"dtype": "BF16", "shape": list(shape), "data_offsets": [2**64 - 1, 2**64 - 1]}
        raw = _safetensors.header_bytes({}, {name: entry})
        bare = len(_safetensors.header_bytes({}, {})) - 1  # (less the closing brace)
        assert len(raw.rstrip()) - bare <= stream.entry_room(name, len(shape))


# ------------------------------------------------------------------ the mapped reader


def test_a_mapped_read_gives_read_only_views_of_the_same_values(tmp_path):
    path = tmp_path / "t.safetensors"
    _safetensors.write(path, _tensors(), {"k": "v"})
    copies, meta, dtypes = _safetensors.read(path)
    views, meta2, dtypes2 = _safetensors.read(path, mapped=True)
    assert (meta2, dtypes2) == (meta, dtypes) and list(views) == list(copies)
    for name, v in views.items():
        assert not v.flags.writeable and copies[name].flags.writeable
        np.testing.assert_array_equal(v, copies[name])
    wide = _safetensors.read(path, bf16_as_f32=True, mapped=True)[0]["b"]
    np.testing.assert_array_equal(wide, _safetensors.bf16_to_f32(copies["b"]))
    blob = path.read_bytes()
    for cut in (0, 5, len(blob) - 1):  # (an empty file has nothing to map)
        (tmp_path / "cut.safetensors").write_bytes(blob[:cut])
        with pytest.raises(FormatError) as mapped:
            _safetensors.read(tmp_path / "cut.safetensors", mapped=True)
        with pytest.raises(FormatError) as read:
            _safetensors.read(tmp_path / "cut.safetensors")
        assert str(mapped.value) == str(read.value)


def test_the_input_of_convert_is_mapped_not_read(tmp_path):
    src = _model(tmp_path / "in.safetensors", n=2, shape=(64, 64))
    for value, _ in _quant_cli.read_any(src).entries.values():
        assert isinstance(value, np.ndarray) and not value.flags.owndata
        assert not value.flags.writeable


def test_a_file_whose_tensors_are_not_aligned_converts_from_its_views(tmp_path):
    # A header not padded to 8 bytes (other writers, older files) leaves the
    # float32 views unaligned: the core copies such a view as it reads it.
    w = np.random.default_rng(2).standard_normal((64, 128)).astype(np.float32)
    header = b'{"w":{"dtype":"F32","shape":[64,128],"data_offsets":[0,32768]}}'
    header += b" " * (1 - len(header) % 2)  # (odd: the data starts at an odd offset)
    src = tmp_path / "odd.safetensors"
    src.write_bytes(len(header).to_bytes(8, "little") + header + w.tobytes())
    value, _ = _quant_cli.read_any(src).entries["w"]
    assert not value.flags.aligned
    out = tmp_path / "out.safetensors"
    report = _quant_cli.convert(src, out, progress=False)
    back = quant.load_file(out)["w"]
    np.testing.assert_array_equal(back.data, quant.quantize(w).data)
    assert report["tensors"][0]["rel_error"] > 0
