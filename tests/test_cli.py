"""The ``neuropil`` command line, run as users run it (console script and -m)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import neuropil
from conftest import read_pipe
from neuropil import _safetensors, cli, quant


def console_script() -> str:
    """The installed ``neuropil`` script: beside this interpreter (a venv that is
    not activated), else on PATH."""
    beside = Path(sys.executable).with_name("neuropil")
    return str(beside) if beside.is_file() else (shutil.which("neuropil") or "neuropil")


def run_cli(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    exe = [sys.executable, "-m", "neuropil"] if module else [console_script()]
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", [False, True])
def test_info_json_via_console_script_and_module(module):
    r = run_cli("info", "--json", module=module)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["version"] == neuropil.__version__
    assert data["simd_level"] == neuropil.simd_level()


def test_version_flag_and_a_reader_that_left_the_pipe():
    r = run_cli("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"neuropil {neuropil.__version__}")
    # `neuropil info --json | head -c 1`: a reader gone before the output is
    # written ends the command quietly with the shell's SIGPIPE code (it was a
    # "neuropil: error: [Errno 32] Broken pipe" and status 1).
    # stdout buffered, as in a shell (PYTHONUNBUFFERED unset): the output of
    # a short command is written at the end, and --version's by argparse.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for args in (["info", "--json"], ["info"], ["--version"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            r = subprocess.run([console_script(), *args], stdout=write_end, env=env,
                               stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
        finally:
            os.close(write_end)
        assert (r.returncode, r.stderr) == (141, ""), args


@pytest.mark.parametrize(
    ("var", "value", "key", "expected"),
    [
        (
            "NEUROPIL_NUM_THREADS",
            "5000",
            "threads",
            'NEUROPIL_NUM_THREADS must be a positive integer at most 4096; got "5000"',
        ),
        ("NEUROPIL_NUM_THREADS", "two", "threads", "NEUROPIL_NUM_THREADS must be a positive"),
        ("NEUROPIL_SPIN_US", "-1", "spin_us", "NEUROPIL_SPIN_US must be an integer number"),
        ("NEUROPIL_KERNEL", "bogus", "simd_level", "NEUROPIL_KERNEL=bogus is not usable here"),
    ],
)
def test_info_reports_a_bad_environment_setting_instead_of_failing(var, value, key, expected):
    # `neuropil info` is where a user looks to see what is wrong: it exited 2
    # with the error (every parallel call raises it) instead of describing it.
    env = {**os.environ, var: value}
    exe = [sys.executable, "-m", "neuropil", "info"]
    for json_out in (False, True):
        r = subprocess.run(
            exe + ["--json"] * json_out, capture_output=True, text=True, env=env, timeout=300
        )
        assert r.returncode == 0, r.stderr
        if json_out:  # (the field stays typed: None, the error in `errors`)
            data = json.loads(r.stdout)
            assert data[key] is None and list(data["errors"]) == [key], data
            shown = data["errors"][key]
            assert re.match(r"\w+Error: ", shown) and expected in shown, shown
        else:
            line = next(ln for ln in r.stdout.splitlines() if ln.split()[0] == key)
            shown = line.split(None, 1)[1]
            assert re.match(r"unusable \(\w+Error: ", shown) and expected in shown, shown
            assert not any(ln.startswith("errors") for ln in r.stdout.splitlines())


def test_a_parallel_call_with_a_bad_thread_count_raises_naming_the_variable():
    code = (
        "import numpy as np, neuropil\n"
        "from neuropil.quant import quantize\n"
        "w = np.ones((4096, 4096), np.float32)\n"
        "for f in (lambda: quantize(w), neuropil.get_num_threads):\n"
        "    try:\n"
        "        f()\n"
        "    except neuropil.ArgumentError as e:\n"
        "        print('ArgumentError:', e)\n"
        "neuropil.set_num_threads(2)\n"  # set explicitly: the variable is not read
        "quantize(w)\n"
        "print(neuropil.get_num_threads())\n"
    )
    env = {**os.environ, "NEUROPIL_NUM_THREADS": "5000"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr  # no panic
    msg = 'ArgumentError: NEUROPIL_NUM_THREADS must be a positive integer at most 4096; got "5000"'
    assert r.stdout.splitlines() == [msg, msg, "2"], r.stdout


def test_info_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "simd_level" in out and neuropil.simd_level() in out


def test_tour_kernels_section_runs_on_real_text(tmp_path, capsys):
    assert cli.main(["tour", "--only", "kernels", "--json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)["kernels"]
    assert report["texts"] >= 1 and report["dims"] == 729
    assert report["max_abs_error_vs_float64"] < 1e-4
    assert report["levels"] == neuropil._native.simd_levels()


def test_tour_text_report(tmp_path):
    # Each capability's section has its own (slow) test; this one checks the frame.
    r = run_cli("tour", "--only", "system", "kernels", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "== system ==" in r.stdout and "== kernels ==" in r.stdout
    assert "sections ran" in r.stdout
    # A report folder that cannot be made fails at once, before any section.
    (tmp_path / "afile").write_text("x")
    r = run_cli("tour", "--only", "system", "--out", str(tmp_path / "afile" / "sub"))
    assert r.returncode == 1 and "== system ==" not in r.stdout
    assert r.stderr.startswith("neuropil: error:") and "afile" in r.stderr


def test_bench_quick_json(capsys):
    assert cli.main(["bench", "simd", "--quick", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = payload["results"]["simd"]
    assert payload["environment"]["machine"]
    assert all(r["neuropil"] > 0 and r["ratios"]["numpy"] > 0 for r in rows)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["tour", "--only", "nosuch"], "--only must be among system, kernels"),
        (["bench", "nosuch"], "NAME must be among simd"),
    ],
)
def test_unknown_names_are_clear_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "got nosuch" in err


def test_no_subcommand_is_a_usage_error():
    r = run_cli()
    assert r.returncode == 2
    assert "usage: neuropil" in r.stderr


def test_os_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    from safetensors.numpy import save_file as st_save

    src = tmp_path / "in.safetensors"
    st_save({"w": np.ones((64, 64), np.float32)}, str(src))
    out = tmp_path / ("x" * 300 + ".safetensors")  # a name longer than any file system takes
    assert cli.main(["quantize", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("neuropil: error: ") and "name too long" in err.lower(), err
    assert "Traceback" not in err


def test_os_errors_of_any_subcommand_exit_nonzero(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/model.safetensors")

    monkeypatch.setattr(cli, "_cmd_info", denied)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err == "neuropil: error: [Errno 13] Permission denied: '/data/model.safetensors'\n"


def test_genuine_bugs_keep_their_traceback(monkeypatch):
    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_info", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info"])


def test_a_missing_input_file_exits_one_and_an_empty_only_is_a_usage_error(tmp_path, capsys):
    # A file error wrapped in a library error (it names the path) keeps exit 1.
    missing = tmp_path / "nope.safetensors"
    assert cli.main(["quantize", str(missing), str(tmp_path / "out.safetensors")]) == 1
    assert capsys.readouterr().err.startswith("neuropil: error: ")
    # `tour --only` with no names is refused, not a run of every section.
    r = run_cli("tour", "--only")
    assert r.returncode == 2 and "expected at least one argument" in r.stderr


# ------------------------------------------------------------------ quantize as a user runs it


def _save(path: Path, tensors: dict) -> Path:
    from safetensors.numpy import save_file as st_save

    st_save(tensors, str(path))
    return path


def test_quantize_writes_into_a_pipe_in_place(tmp_path):
    # The output is written beside and renamed over the target, which put a
    # regular file in place of a pipe or device (as root, /dev/null itself);
    # such a target is written in place, as open(OUT, "wb") would.
    src = _save(tmp_path / "in.safetensors", {"w": np.ones((64, 64), np.float32)})
    fifo = tmp_path / "pipe"
    reader, got = read_pipe(fifo)
    assert cli.main(["quantize", str(src), str(fifo), "--json"]) == 0
    reader.join(timeout=30)
    assert not reader.is_alive() and stat.S_ISFIFO(os.stat(fifo).st_mode)
    (tmp_path / "out.safetensors").write_bytes(got[0])
    assert set(quant.load_file(tmp_path / "out.safetensors")) == {"w"}


@pytest.mark.parametrize("json_report", [False, True])
@pytest.mark.parametrize("stdout", ["pipe", "file"])
def test_quantize_to_dev_stdout_puts_the_report_on_stderr(tmp_path, stdout, json_report):
    # `neuropil quantize IN /dev/stdout | cat > x`: the report printed after the
    # file's bytes made x a corrupt file; it goes to stderr when OUT is stdout.
    if not (os.path.exists("/dev/stdout") and os.path.exists("/proc/self/fd/1")):
        pytest.skip("no /dev/stdout or /proc")
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    src = _save(tmp_path / "in.safetensors", {"w": w})
    # `... > x` names stdout /proc/self/fd/1, the same file: a saver that renamed
    # a temporary file over the link itself cannot replace that one, where as
    # root it would replace /dev/stdout for the whole machine.
    out = "/dev/stdout" if stdout == "pipe" else "/proc/self/fd/1"
    cmd = [sys.executable, "-m", "neuropil", "quantize", str(src), out]
    cmd += ["--json"] if json_report else []
    captured = tmp_path / "captured.safetensors"
    if stdout == "pipe":  # `... | cat > x`
        r = subprocess.run(cmd, capture_output=True, timeout=300)
        captured.write_bytes(r.stdout)
    else:  # `... > x`
        with open(captured, "wb") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    back = quant.load_file(captured)
    assert set(back) == {"w"}
    np.testing.assert_array_equal(back["w"].data, quant.quantize(w).data)
    if json_report:
        report = json.loads(err)
        assert (report["output"], report["quantized_tensors"]) == (out, 1)
    else:
        assert "tensors quantized" in err and f"-> {out}:" in err


def test_the_report_stays_on_stdout_for_a_file(tmp_path, capsys):
    src = _save(tmp_path / "in.safetensors", {"w": np.ones((64, 64), np.float32)})
    assert cli.main(["quantize", str(src), str(tmp_path / "out.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_tensors"] == 1


def _write_gguf(path: Path, tensors: dict) -> Path:
    """A GGUF file of Q8_0 tensors, written by the ``gguf`` package."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize as gguf_quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), "test")
    for name, w in tensors.items():
        writer.add_tensor(name, gguf_quantize(w, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_skip_keeps_gguf_tensors_of_the_target_format_in_float(tmp_path, capsys):
    # A Q8_0 GGUF tensor quantized to q8_0 was carried over as blocks before
    # --skip was read: a skipped one is dequantized and copied in float.
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal((8, 64)).astype(np.float32) for n in ("keep", "skip.me")}
    src = _write_gguf(tmp_path / "in.gguf", w)
    out = tmp_path / "out.safetensors"
    argv = ["quantize", str(src), str(out), "--scheme", "q8_0", "--skip", "skip", "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["tensor"] for r in report["tensors"]] == ["keep"]
    back = quant.load_file(out)
    kept = back["keep"]  # carried over byte for byte
    assert isinstance(kept, quant.QuantizedWeights) and kept.scheme == "q8_0"
    skipped = back["skip.me"]
    assert isinstance(skipped, np.ndarray) and skipped.dtype == np.float32
    # the values the Q8_0 blocks hold (the float input is not in the file)
    blocks = quant.quantize(w["skip.me"], scheme="q8_0")
    np.testing.assert_array_equal(skipped, blocks.dequantize())
    assert report["bytes_after"] == kept.memory_bytes + skipped.nbytes


def test_gguf_blocks_packed_again_get_a_note_and_empty_tensors_are_kept(tmp_path, capsys):
    # Q8_0 blocks quantized to 4-bit asym are rounded once more: the report
    # says which scheme keeps them; --scheme q8_0 carries them over (no note).
    rng = np.random.default_rng(1)
    src = _write_gguf(tmp_path / "in.gguf", {"w": rng.standard_normal((8, 64)).astype(np.float32)})
    out = tmp_path / "out.safetensors"
    assert cli.main(["quantize", str(src), str(out), "--min-size", "0"]) == 0
    assert "note: 1 Q8_0 tensors of the GGUF file were re-quantized; --scheme q8_0 keeps them" in (
        capsys.readouterr().out
    )
    assert cli.main(["quantize", str(src), str(out), "--scheme", "q8_0", "--min-size", "0"]) == 0
    assert "note:" not in capsys.readouterr().out
    # An empty matrix has nothing to pack: kept (it was "w must not be empty").
    src = _save(tmp_path / "e.safetensors", {"e": np.zeros((0, 64), np.float32),
                                             "w": np.ones((64, 64), np.float32)})  # fmt: skip
    assert cli.main(["quantize", str(src), str(out), "--min-size", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["tensor"] for r in report["kept"]] == ["e"] and report["quantized_tensors"] == 1
    assert quant.load_file(out)["e"].shape == (0, 64)


@pytest.mark.parametrize(
    "tensor,argv,message",
    [
        (np.ones((64, 100), np.float32), ["--scheme", "q4_0"], "divisible by 32"),
        (np.full((64, 64), np.nan, np.float32), [], "finite"),
    ],
)
def test_a_tensor_that_cannot_be_quantized_is_named(tmp_path, capsys, tensor, argv, message):
    src = _save(
        tmp_path / "in.safetensors",
        {"model.ok.weight": np.ones((64, 64), np.float32), "model.bad.weight": tensor},
    )
    out = tmp_path / "out.safetensors"
    # (--json: no progress bar on stderr)
    assert cli.main(["quantize", str(src), str(out), "--json", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuropil: error: tensor 'model.bad.weight'") and message in err
    assert "--skip model.bad.weight" in err and not out.exists()
    # the hint works
    assert cli.main(["quantize", str(src), str(out), *argv, "--skip", "model.bad.weight"]) == 0


@pytest.mark.parametrize("name", ["layers[0].w", "a*b", "two words", "it's"])
def test_the_skip_hint_works_as_printed_for_any_name(tmp_path, capsys, name):
    # The hint is a glob matching only the name ("[" and "*" escaped), quoted
    # for the shell: pasted into a shell it keeps this tensor, and only it.
    import shlex

    other = name.replace("[0]", "0").replace("*", "x").replace(" ", "_").replace("'", "")
    nan = np.full((64, 64), np.nan, np.float32)
    src = _save(tmp_path / "in.safetensors", {name: nan, other: np.ones((64, 64), np.float32)})
    out = tmp_path / "out.safetensors"
    assert cli.main(["quantize", str(src), str(out), "--json"]) == 2
    err = capsys.readouterr().err
    hint = err.rsplit("(keep it in float with ", 1)[1].rsplit(")", 1)[0]
    # what the shell makes of it
    argv = shlex.split(hint)
    assert argv[0] == "--skip" and len(argv) == 2
    assert cli.main(["quantize", str(src), str(out), "--json", *argv]) == 0
    back = quant.load_file(out)
    assert isinstance(back[name], np.ndarray)
    assert isinstance(back[other], quant.QuantizedWeights)


def test_copied_tensors_keep_their_float_dtype_and_the_report_counts_them(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((64, 128)).astype(np.float32),
        "norm16": rng.standard_normal(300).astype(np.float16),
        "bias64": rng.standard_normal(300),
        "ids": np.arange(300, dtype=np.int32),
    }
    src = _save(tmp_path / "in.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    assert cli.main(["quantize", str(src), str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    back = neuropil.quant.load_file(out)
    for name in ("norm16", "bias64", "ids"):
        assert back[name].dtype == tensors[name].dtype
        np.testing.assert_array_equal(back[name], tensors[name])
    assert report["bytes_before"] == sum(t.nbytes for t in tensors.values())
    assert report["bytes_after"] == back["w"].memory_bytes + sum(
        tensors[n].nbytes for n in ("norm16", "bias64", "ids")
    )


def test_the_text_report_says_larger_when_the_output_grows(tmp_path, capsys):
    # A skipped Q8_0 tensor is dequantized to float32: 16384 bytes for 4352.
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    src = _write_gguf(tmp_path / "in.gguf", {"t": w})
    assert cli.main(["quantize", str(src), str(tmp_path / "out.safetensors"), "--skip", "t"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "... 1 tensors kept unquantized (float32: 1)", lines
    assert lines[-1].endswith("(3.76x larger)"), lines


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (round to nearest even), as uint16 bits."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _header_dtypes(path: Path) -> dict[str, str]:
    from neuropil import _safetensors

    return _safetensors.read(path)[2]


def test_a_bfloat16_safetensors_tensor_kept_in_float_stays_bfloat16(tmp_path, capsys):
    # It was widened to float32 (numpy has no bfloat16): twice its bytes.
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as st_save

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(64, 128, generator=g, dtype=torch.bfloat16),
        "skip.w": torch.randn(64, 128, generator=g, dtype=torch.bfloat16),
        "norm": torch.randn(300, generator=g, dtype=torch.bfloat16),
    }
    src = tmp_path / "in.safetensors"
    st_save(tensors, str(src))
    out = tmp_path / "out.safetensors"
    assert cli.main(["quantize", str(src), str(out), "--skip", "skip", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert _header_dtypes(out) == {"w.qdata": "U8", "w.scales": "F16", "w.mins": "F16",
                                   "skip.w": "BF16", "norm": "BF16"}  # fmt: skip
    back = quant.load_file(out)  # bfloat16 read back as float32, exactly
    for name in ("skip.w", "norm"):
        np.testing.assert_array_equal(back[name], tensors[name].float().numpy())
    np.testing.assert_array_equal(back["w"].data, quant.quantize(tensors["w"].float().numpy()).data)
    kept = {r["tensor"]: (r["from"], r["dtype"]) for r in report["kept"]}
    assert kept == {"skip.w": ("BF16", "bfloat16"), "norm": ("BF16", "bfloat16")}
    # every row names the tensor's type in the input, quantized ones too
    assert [(r["tensor"], r["from"]) for r in report["tensors"]] == [("w", "BF16")]
    assert report["bytes_before"] == 2 * (2 * 64 * 128 + 300)
    assert report["bytes_after"] == back["w"].memory_bytes + 2 * (64 * 128 + 300)


def _write_llama_gguf(path: Path, tensors: dict, heads: int = 2) -> Path:
    """A Llama-architecture GGUF (renamed to transformers' names on reading) of
    ``{name: (float32 array, GGML type name)}``, written by the ``gguf`` package."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize as gguf_quantize

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    for name, (w, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in ("F32", "F16"):
            writer.add_tensor(name, w.astype(np.float32 if kind == "F32" else np.float16))
        else:
            writer.add_tensor(name, gguf_quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_tensors_kept_in_float_keep_their_dtype(tmp_path, capsys):
    # F16 stayed float16, but BF16 was widened to float32; a skipped Q4_1/Q8_0
    # tensor is dequantized: float32 (d * q + m needs it), or float16 where
    # that holds every value exactly.
    torch = pytest.importorskip("torch")
    from neuropil.torch import load_quantized

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    ints = rng.integers(-127, 128, (64, 128)).astype(np.float32)
    ints[:, ::32] = 127  # each Q8_0 block's scale is 1: its values are small integers
    v = rng.standard_normal(128).astype(np.float32)
    src = _write_llama_gguf(
        tmp_path / "in.gguf",
        {
            "blk.0.attn_q.weight": (w, "F32"),
            "blk.0.attn_k.weight": (w, "BF16"),  # rows reordered as q's
            "blk.0.attn_v.weight": (w, "F16"),
            "blk.0.attn_output.weight": (w, "Q4_1"),
            "blk.0.ffn_up.weight": (ints, "Q8_0"),
            "blk.0.ffn_down.weight": (w.T.copy(), "Q4_1"),  # quantized: carried over
            "blk.0.attn_norm.weight": (v, "BF16"),
            "output_norm.weight": (v, "F16"),
        },
    )
    out = tmp_path / "out.safetensors"
    argv = ["quantize", str(src), str(out), "--scheme", "q4_1", "--json"]
    argv += ["--skip", "model.layers.0.self_attn", "up_proj"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    dtypes = _header_dtypes(out)
    assert {k: v for k, v in dtypes.items() if not k.startswith(mlp + "down_proj.")} == {
        attn + "q_proj.weight": "F32",
        attn + "k_proj.weight": "BF16",
        attn + "v_proj.weight": "F16",
        attn + "o_proj.weight": "F32",
        mlp + "up_proj.weight": "F16",
        "model.layers.0.input_layernorm.weight": "BF16",
        "model.norm.weight": "F16",
    }
    back = quant.load_file(out)
    q = back[attn + "q_proj.weight"]  # F32, rows in transformers' order
    np.testing.assert_array_equal(back[attn + "k_proj.weight"], _bf16_f32(_bf16_bits(q)))
    np.testing.assert_array_equal(back[attn + "v_proj.weight"], w.astype(np.float16))
    np.testing.assert_array_equal(
        back[attn + "o_proj.weight"], quant.quantize(w, scheme="q4_1").dequantize()
    )
    np.testing.assert_array_equal(back[mlp + "up_proj.weight"], ints.astype(np.float16))
    np.testing.assert_array_equal(
        back["model.layers.0.input_layernorm.weight"], _bf16_f32(_bf16_bits(v))
    )
    kept = {r["tensor"]: (r["from"], r["dtype"]) for r in report["kept"]}
    assert kept[attn + "k_proj.weight"] == ("BF16", "bfloat16")
    assert kept[attn + "o_proj.weight"] == ("Q4_1", "float32")
    assert kept[mlp + "up_proj.weight"] == ("Q8_0", "float16")
    # the report's sizes are the file's tensors, byte for byte
    blob = out.read_bytes()
    data_bytes = len(blob) - 8 - int.from_bytes(blob[:8], "little")
    assert report["bytes_after"] == data_bytes
    # neuropil.torch loads it (bfloat16 as float32 values, then the model's dtype)
    nn = torch.nn

    def linear(rows, cols):
        return nn.Linear(cols, rows, bias=False)

    layer = nn.ModuleDict(
        {
            "self_attn": nn.ModuleDict(
                {p: linear(64, 128) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
            ),
            "mlp": nn.ModuleDict({"up_proj": linear(64, 128), "down_proj": linear(128, 64)}),
            "input_layernorm": nn.LayerNorm(128, bias=False),
        }
    )
    norm = nn.LayerNorm(128, bias=False)
    model = nn.ModuleDict(
        {"model": nn.ModuleDict({"layers": nn.ModuleList([layer]), "norm": norm})}
    )
    load_quantized(model, out)
    got = model.model.layers[0]
    np.testing.assert_array_equal(
        got.self_attn.k_proj.weight.detach().numpy(), back[attn + "k_proj.weight"]
    )
    np.testing.assert_array_equal(
        got.input_layernorm.weight.detach().numpy(), _bf16_f32(_bf16_bits(v))
    )
    assert type(got.mlp.down_proj).__name__ == "QuantizedLinear"


def test_gguf_float64_and_integer_tensors_are_copied_as_stored(tmp_path, capsys):
    # They went to gguf's dequantize, which has none for them: "not a valid GGUF".
    gguf = pytest.importorskip("gguf")
    src = tmp_path / "in.gguf"
    writer = gguf.GGUFWriter(str(src), "test")
    tensors = {"ids": np.arange(10, dtype=np.int32), "f64": np.linspace(0, 1, 4096).reshape(64, 64)}
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out.safetensors"
    assert cli.main(["quantize", str(src), str(out), "--skip", "f64", "--json"]) == 0
    assert _header_dtypes(out) == {"ids": "I32", "f64": "F64"}
    back = quant.load_file(out)
    for name, t in tensors.items():
        np.testing.assert_array_equal(back[name], t)


_bf16_f32 = _safetensors.bf16_to_f32


def test_ctrl_c_while_saving_keeps_the_old_output_and_leaves_no_temp_file(
    tmp_path, capsys, monkeypatch
):
    src = _save(tmp_path / "in.safetensors", {"w": np.ones((64, 64), np.float32)})
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the old output")

    def interrupted(a, b):  # the temporary file is written; the rename never happens
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    assert cli.main(["quantize", str(src), str(out), "--json"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "neuropil: interrupted" and "Traceback" not in err
    assert out.read_bytes() == b"the old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]


def test_a_failed_data_install_is_one_line(monkeypatch, capsys):
    from neuropil import data

    def pip_fails():
        raise subprocess.CalledProcessError(1, [sys.executable, "-m", "pip", "install", "x==1"])

    monkeypatch.setattr(data, "install_missing", pip_fails)
    assert cli.main(["data", "--install"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("neuropil: error: ") and "pip install x==1" in err
    assert err.count("\n") == 1


# ------------------------------------------------------------------ --skip patterns


def _two_layers(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    names = ("model.layers.0.mlp.up_proj.weight", "lm_head.weight")
    return _save(
        tmp_path / "in.safetensors",
        {n: rng.standard_normal((64, 64)).astype(np.float32) for n in names},
    )


def test_a_skip_pattern_that_matches_nothing_is_an_error_before_writing(tmp_path, capsys):
    # A typo once quantized the layer the user meant to keep, silently.
    src = _two_layers(tmp_path)
    out = tmp_path / "out.safetensors"
    argv = ["quantize", str(src), str(out), "--json", "--skip", "model.layers.0", "lm_haed"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuropil: error: --skip pattern 'lm_haed'"), err
    assert "matches no tensor or module" in err and "'lm_head'" in err, err
    assert err.count("\n") == 1 and not out.exists()
    # patterns that match (a module, a component, a glob) are accepted
    for pattern in ("lm_head", "mlp", "*.up_proj", "lm_head.weight", "model.layers.*"):
        assert cli.main(["quantize", str(src), str(out), "--json", "--skip", pattern]) == 0
        kept = quant.load_file(out)
        assert sum(isinstance(v, np.ndarray) for v in kept.values()) == 1, pattern
    capsys.readouterr()
    # a glob that matches nothing, far from every name: a few names as examples
    assert cli.main(["quantize", str(src), str(out), "--skip", "*.zzz"]) == 2
    err = capsys.readouterr().err
    assert "'*.zzz'" in err and "lm_head" in err, err


def test_skip_patterns_before_the_positionals(tmp_path, capsys):
    src = _two_layers(tmp_path)
    out = tmp_path / "out.safetensors"
    # --skip takes every word after it: the positionals went with it
    r = run_cli("quantize", "--skip", "lm_head", "mlp", str(src), str(out))
    assert r.returncode == 2 and not out.exists()
    assert "the following arguments are required: input, output" in r.stderr
    assert "--skip took every word after it" in r.stderr and "--skip=PATTERN" in r.stderr
    assert "Traceback" not in r.stderr
    # the ways that work: after IN OUT (as before), --skip=, or -- ending the list;
    # and repeated --skip's add up instead of the last one winning
    for argv in (
        [str(src), str(out), "--skip", "lm_head", "mlp"],
        ["--skip=lm_head", "--skip=mlp", str(src), str(out)],
        ["--skip", "lm_head", "mlp", "--", str(src), str(out)],
        [str(src), "--skip", "lm_head", "--skip", "mlp", "--", str(out)],
    ):
        out.unlink(missing_ok=True)
        assert cli.main(["quantize", "--json", *argv]) == 0, argv
        report = json.loads(capsys.readouterr().out)
        assert report["quantized_tensors"] == 0, argv


def _small_llama_gguf(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = {"F32": rng.standard_normal((64, 128)).astype(np.float32)}
    names = ["token_embd.weight", "output.weight"] + [
        f"blk.{i}.{p}.weight" for i in (0, 1) for p in ("attn_q", "attn_k", "ffn_up", "ffn_down")
    ]
    tensors = {n: (w["F32"], "F32") for n in names}
    tensors["output_norm.weight"] = (w["F32"][0], "F32")
    return _write_llama_gguf(tmp_path / "in.gguf", tensors)


def _kept(argv: list[str], capsys) -> set[str]:
    assert cli.main(["quantize", *argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    return {r["tensor"] for r in report["kept"]}


@pytest.mark.parametrize(
    "gguf_pattern,hf_pattern",
    [
        ("blk.0.attn_q", "model.layers.0.self_attn.q_proj"),  # a module, as gguf-dump shows it
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),  # a tensor
        ("blk.*.ffn_down", "model.layers.*.mlp.down_proj"),  # a glob
        ("blk.1", "model.layers.1"),  # a block
        ("output", "lm_head"),  # a name component
        ("token_embd", "embed_tokens"),
    ],
)
def test_skip_takes_the_gguf_names_of_a_renamed_gguf(tmp_path, capsys, gguf_pattern, hf_pattern):
    # A Llama GGUF's tensors get transformers' names; --skip with the file's own
    # names (what gguf-dump shows) was an error whose hint did not point there.
    src, out = _small_llama_gguf(tmp_path), tmp_path / "out.safetensors"
    norm = {"model.norm.weight"}  # 1-D: never quantized
    kept = _kept([str(src), str(out), "--skip", gguf_pattern], capsys)
    assert kept == _kept([str(src), str(out), "--skip", hf_pattern], capsys)
    assert len(kept - norm) >= 1
    # mixed with transformers names, as one list
    both = _kept([str(src), str(out), "--skip", gguf_pattern, "model.layers.0.mlp"], capsys)
    assert both == kept | {
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }


def test_an_unmatched_skip_pattern_of_a_gguf_shows_both_names(tmp_path, capsys):
    from neuropil.data import smollm2_gguf

    out = tmp_path / "out.safetensors"
    assert cli.main(["quantize", str(smollm2_gguf()), str(out), "--skip", "blk.0.atn_q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuropil: error: --skip pattern 'blk.0.atn_q' must match"), err
    assert "nearest: 'blk.0.attn_q' (= 'model.layers.0.self_attn.q_proj')" in err, err
    assert "GGUF tensor names are renamed to transformers' names " in err, err
    assert "(blk.0.attn_q -> model.layers.0.self_attn.q_proj); patterns may use either" in err
    assert err.count("\n") == 1 and not out.exists()


def test_skip_takes_gguf_names_of_the_real_smollm2_gguf(tmp_path, capsys):
    from neuropil.data import smollm2_gguf

    out = tmp_path / "out.safetensors"
    argv = ["quantize", str(smollm2_gguf()), str(out), "--scheme", "q4_1", "--json"]
    assert cli.main([*argv, "--skip", "blk.0.attn_q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantized_tensors"] == 7 * 30  # the embedding (Q8_0) too
    (kept,) = [r for r in report["kept"] if r["from"] != "F32"]  # (the F32 norms are 1-D)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert kept == {"tensor": q, "shape": [576, 576], "from": "Q4_1", "dtype": "float32"}
    assert isinstance(quant.load_file(out)[q], np.ndarray)
    # the quantized rows name the input's type as the kept ones do (blocks
    # carried over as they are, and the Q8_0 embedding quantized to q4_1)
    froms = {r["tensor"]: r["from"] for r in report["tensors"]}
    assert froms["model.layers.0.self_attn.k_proj.weight"] == "Q4_1"
    assert froms["model.embed_tokens.weight"] == "Q8_0"


# ------------------------------------------------------------------ data


def test_data_exits_one_when_something_is_missing(monkeypatch, capsys, tmp_path):
    # Scripts check `neuropil data`'s exit status; it was 0 with a model missing.
    from neuropil import data

    assert cli.main(["data"]) == 0  # everything is installed here
    assert "missing" not in capsys.readouterr().out

    def no_minilm():
        raise FileNotFoundError("all-MiniLM-L6-v2 not found: run `neuropil data --install`")

    monkeypatch.setattr(data, "minilm_dir", no_minilm)
    assert cli.main(["data"]) == 1
    captured = capsys.readouterr()
    assert "all-MiniLM-L6-v2   missing (" in captured.out
    assert captured.err == (
        "neuropil: error: missing: all-MiniLM-L6-v2 (run `neuropil data --install`)\n"
    )
    # no license texts at all: a missing row too, not a traceback or a bare error line
    monkeypatch.setattr(data, "LICENSE_DIR", tmp_path / "none")
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"stdlib": str(tmp_path)})
    assert cli.main(["data"]) == 1
    captured = capsys.readouterr()
    assert "license texts      missing (no license texts in" in captured.out
    assert "missing: license texts, all-MiniLM-L6-v2" in captured.err
    # --install still installs what is missing, and still exits 1 if that did not help
    monkeypatch.setattr(data, "install_missing", lambda: [])
    assert cli.main(["data", "--install"]) == 1
    assert "still missing after --install: license texts" in capsys.readouterr().err


# ------------------------------------------------------------------ info without torch


def _info_with_torch(tmp_path: Path, init: str | None, *args: str) -> subprocess.CompletedProcess:
    """``python -m neuropil info`` with a stand-in ``torch`` package (``init`` its
    ``__init__.py``) first on the path, or with torch hidden (``init=None``)."""
    env = dict(os.environ)
    if init is None:
        code = "import sys; sys.modules['torch'] = None; from neuropil.cli import main; "
    else:
        (tmp_path / "torch").mkdir()
        (tmp_path / "torch" / "__init__.py").write_text(init)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
        code = "from neuropil.cli import main; "
    code += f"raise SystemExit(main(['info', *{list(args)!r}]))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_info_says_plainly_when_torch_is_missing_or_broken(tmp_path):
    # The table once read `torch  None`.
    r = _info_with_torch(tmp_path / "a", None)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert lines["torch"] == "not installed" and "None" not in r.stdout
    r = _info_with_torch(tmp_path / "a", None, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["torch"] is None  # JSON: null
    # found but failing on import, or without a version: said so, no traceback
    for init, why in [
        ("raise ImportError('libtorch_cpu.so: cannot open shared object file')", "ImportError"),
        ("", "no attribute '__version__'"),
        ("__version__ = None\nclass cuda:\n    is_available = staticmethod(bool)", "no version"),
    ]:
        (tmp_path / "b").mkdir()
        r = _info_with_torch(tmp_path / "b", init)
        shutil.rmtree(tmp_path / "b")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        lines = dict(line.split(None, 1) for line in r.stdout.splitlines())
        assert lines["torch"].startswith("installed, but unusable (") and why in lines["torch"]


def test_convert_takes_skip_none_and_refuses_non_string_patterns(tmp_path):
    # The CLI's converter, called from Python, read skip=None as an iterable
    # (TypeError) and a pattern 5 as its own error; both now follow quantize_model.
    from neuropil import _quant_cli
    from neuropil.errors import ArgumentError

    src = _save(tmp_path / "in.safetensors", {"w": np.ones((64, 64), np.float32)})
    report = _quant_cli.convert(src, tmp_path / "out.safetensors", skip=None, progress=False)
    assert [r["tensor"] for r in report["tensors"]] == ["w"]
    with pytest.raises(ArgumentError, match=r"--skip patterns must be strings .*got 5"):
        _quant_cli.convert(src, tmp_path / "out2.safetensors", skip=[5], progress=False)


# ------------------------------------------------------------------ quantize streams its output


def _mixed_safetensors(tmp_path: Path) -> Path:
    """Every kind of entry: packed float32 and float16 matrices, a bfloat16
    matrix kept by --skip, a small matrix kept by --min-size, 1-D, 0-d and
    integer tensors, an empty matrix."""
    rng = np.random.default_rng(0)
    path = tmp_path / "mixed.safetensors"
    mlp = "model.layers.0.mlp"
    _safetensors.write(
        path,
        {
            f"{mlp}.up_proj.weight": rng.standard_normal((96, 128)).astype(np.float32),
            f"{mlp}.down_proj.weight": rng.standard_normal((128, 96)).astype(np.float16),
            "model.embed.weight": _safetensors.BF16(_bf16_bits(rng.standard_normal((64, 64)))),
            "model.small.weight": rng.standard_normal((8, 32)).astype(np.float32),
            "model.norm.weight": rng.standard_normal(128).astype(np.float32),
            "model.scale": np.array(0.5, np.float32),
            "model.ids": np.arange(10, dtype=np.int64),
            "model.empty.weight": np.zeros((0, 64), np.float32),
        },
        {},
    )
    return path


def _llama_gguf(tmp_path: Path) -> Path:
    """A Llama-architecture GGUF (renamed, q/k rows reordered when read): Q8_0
    q and k projections, a Q8_0 embedding and an F16 up projection, F32 norms."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize as gguf_quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(3)
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for name, shape in [("token_embd.weight", (96, 64)), ("blk.0.attn_q.weight", (64, 64)),
                        ("blk.0.attn_k.weight", (32, 64))]:  # fmt: skip
        w = rng.standard_normal(shape).astype(np.float32)
        writer.add_tensor(name, gguf_quantize(w, q8), raw_dtype=q8)
    writer.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((128, 64)).astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _recording_entries(monkeypatch) -> dict:
    """The entries convert stores, by name, recorded as it writes each one:
    the dict the old convert held and gave save_file(dst, out) at the end."""
    from neuropil import _quant_cli

    entries: dict = {}
    real = _quant_cli._entry_tensors

    def recording(name, entry):
        entries[name] = entry
        return real(name, entry)

    monkeypatch.setattr(_quant_cli, "_entry_tensors", recording)
    return entries


def _split(blob: bytes) -> tuple[bytes, bytes]:
    """A safetensors file's JSON header, trailing spaces stripped, and its data."""
    n = int.from_bytes(blob[:8], "little")
    return blob[8 : 8 + n].rstrip(b" "), blob[8 + n :]


@pytest.mark.parametrize(
    "source,argv",
    [
        ("safetensors", {"skip": ("model.embed",)}),
        ("safetensors", {"bits": 8, "group_size": 32, "scheme": "sym"}),
        ("gguf", {"scheme": "q8_0", "skip": ("token_embd",)}),
        ("gguf", {"bits": 4, "group_size": 32}),
    ],
)
def test_a_streamed_output_is_what_save_file_writes(tmp_path, monkeypatch, capsysbinary, source,
                                                    argv):  # fmt: skip
    # convert writes each tensor as it is made, the header (offsets) last, in
    # room reserved before the data; the file is the one save_file writes for
    # the same entries but for spaces padding the header (the format allows
    # them), and exactly that file when written to stdout (it cannot seek: the
    # header goes first). Both load with every reader.
    from safetensors import safe_open

    from neuropil import _quant_cli, _safetensors_stream

    src = _mixed_safetensors(tmp_path) if source == "safetensors" else _llama_gguf(tmp_path)
    entries = _recording_entries(monkeypatch)

    def no_move(*args):  # (the room reserved for the header is an upper bound)
        raise AssertionError("the header outgrew its room")

    monkeypatch.setattr(_safetensors_stream, "_move_up", no_move)
    streamed = tmp_path / "streamed.safetensors"
    report = _quant_cli.convert(src, streamed, min_size=1024, progress=False, **argv)
    assert report["quantized_tensors"] >= 2 and report["kept"]
    whole = tmp_path / "whole.safetensors"
    quant.save_file(whole, entries)
    header, data = _split(streamed.read_bytes())
    assert (header, data) == _split(whole.read_bytes())
    assert int.from_bytes(streamed.read_bytes()[:8], "little") % 8 == 0  # data aligned
    # to stdout: byte for byte
    capsysbinary.readouterr()
    _quant_cli.convert(src, "-", min_size=1024, progress=False, **argv)
    assert capsysbinary.readouterr().out == whole.read_bytes()
    # every reader: safetensors, neuropil's loaders
    tensors, meta, _ = _safetensors.read(whole)
    with safe_open(str(streamed), "np") as f:
        assert f.metadata() == meta and set(f.keys()) == set(tensors)
    for name, arr in _safetensors.read(streamed)[0].items():
        np.testing.assert_array_equal(arr, tensors[name])
    back, want = quant.load_file(streamed), quant.load_file(whole)
    assert list(back) == list(want) and set(back) == set(entries)
    for name, q in back.items():
        if isinstance(q, quant.QuantizedWeights):
            np.testing.assert_array_equal(q.dequantize(), want[name].dequantize())
            assert quant.QuantizedWeights.load(streamed, name).shape == q.shape


def test_gguf_q_and_k_rows_are_put_in_order_as_they_are_converted(tmp_path):
    # The reordered copy of a q or k projection is made when it is converted
    # (one at a time), not as the file is read; its rows are those
    # transformers' GGUF loader gives.
    from gguf import GGUFReader

    from neuropil import _quant_cli

    src = _llama_gguf(tmp_path)
    source = _quant_cli.read_any(src)
    value, _ = source.entries["model.layers.0.self_attn.k_proj.weight"]
    _, raw, shape = value
    assert isinstance(raw, _quant_cli.Lazy) and shape == (32, 64)
    out = tmp_path / "out.safetensors"
    _quant_cli.convert(src, out, scheme="q8_0", min_size=0, progress=False)
    k = quant.load_file(out)["model.layers.0.self_attn.k_proj.weight"].dequantize()
    t = next(t for t in GGUFReader(src).tensors if t.name == "blk.0.attn_k.weight")
    stored = quant.QuantizedWeights.from_gguf(np.asarray(t.data), "q8_0", (32, 64)).dequantize()
    heads = 2  # each head's rows: its two rotary halves interleaved in the file
    want = stored.reshape(heads, 8, 2, 64).swapaxes(1, 2).reshape(32, 64)
    np.testing.assert_array_equal(k, want)


@pytest.mark.parametrize("failure", ["a tensor that cannot be quantized", "Ctrl-C"])
def test_a_conversion_that_fails_midway_keeps_the_old_output_and_no_temp_file(
    tmp_path, capsys, monkeypatch, failure
):
    # The output is written as the tensors are converted, into a temporary
    # file beside OUT, renamed over it only at the end.
    from neuropil import _quant_cli

    rng = np.random.default_rng(0)
    # (large enough to go past the writer's buffer as each is written)
    tensors = {f"layers.{i}.weight": rng.standard_normal((128, 512)).astype(np.float32)
               for i in range(3)}  # fmt: skip
    if failure != "Ctrl-C":
        tensors["layers.1.weight"][5, 5] = np.nan
    src = _save(tmp_path / "in.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the old output")
    out.chmod(0o640)
    seen: list[list[tuple[str, int]]] = []
    real = _quant_cli.quantize

    def quantize(w, *args, **kwargs):  # (the files beside OUT as each tensor is packed)
        seen.append([(p.name, p.stat().st_size) for p in tmp_path.glob(".out.safetensors.*")])
        if failure == "Ctrl-C" and len(seen) == 3:  # (the first call checks the format)
            raise KeyboardInterrupt
        return real(w, *args, **kwargs)

    monkeypatch.setattr(_quant_cli, "quantize", quantize)
    code = cli.main(["quantize", str(src), str(out), "--json"])
    assert code == (130 if failure == "Ctrl-C" else 2)
    err = capsys.readouterr().err
    assert ("interrupted" if failure == "Ctrl-C" else "tensor 'layers.1.weight'") in err, err
    assert out.read_bytes() == b"the old output" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]
    # the first tensor had been written when the second was being packed
    assert len(seen) == 3 and len(seen[2]) == 1 and seen[2][0][1] > 128 * 512 // 2, seen


def test_tensor_names_that_would_clash_are_refused_before_any_is_converted(
    tmp_path, capsys, monkeypatch
):
    # A packed `w` is stored as w.qdata, w.scales and w.mins (a name reserved
    # even where a symmetric scheme has no mins): a tensor `w.mins` beside it
    # would be read back as its mins. save_file refused it after every tensor
    # was quantized; the names are now checked before any is.
    from neuropil import _quant_cli

    src = _save(tmp_path / "in.safetensors",
                {"w": np.ones((64, 64), np.float32), "w.mins": np.ones(4, np.float32)})  # fmt: skip
    calls = []
    real = _quant_cli.quantize
    monkeypatch.setattr(
        _quant_cli, "quantize", lambda w, *a, **k: calls.append(1) or real(w, *a, **k)
    )
    out = tmp_path / "out.safetensors"
    assert cli.main(["quantize", str(src), str(out), "--json", "--scheme", "sym"]) == 2
    err = capsys.readouterr().err
    assert "must name distinct tensors" in err and "'w.mins'" in err, err
    assert len(calls) == 1 and not out.exists()  # (the one call checks the format)


@pytest.mark.parametrize("json_report", [False, True])
@pytest.mark.parametrize("stdout", ["pipe", "file"])
def test_quantize_to_dash_writes_stdout_and_the_report_to_stderr(tmp_path, stdout, json_report):
    # `neuropil quantize IN -` wrote a file named "-"; "-" is stdout, as for
    # most commands (a file named "-" is "./-"), the report going to stderr.
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    src = _save(tmp_path / "in.safetensors", {"w": w, "b": np.ones(64, np.float32)})
    cmd = [sys.executable, "-m", "neuropil", "quantize", str(src), "-"]
    cmd += ["--json"] if json_report else []
    captured = tmp_path / "captured.safetensors"
    if stdout == "pipe":  # `... - | cat > x`
        r = subprocess.run(cmd, capture_output=True, timeout=300, cwd=tmp_path)
        captured.write_bytes(r.stdout)
    else:  # `... - > x` (written in order from where stdout is, as to a pipe)
        with open(captured, "wb") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, timeout=300, cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert not (tmp_path / "-").exists()
    back = quant.load_file(captured)
    np.testing.assert_array_equal(back["w"].data, quant.quantize(w).data)
    np.testing.assert_array_equal(back["b"], np.ones(64, np.float32))
    if json_report:
        report = json.loads(err)
        assert (report["output"], report["quantized_tensors"]) == ("-", 1)
    else:
        assert "tensors quantized" in err and "-> -:" in err
    # a file named "-": ./-
    assert cli.main(["quantize", str(src), str(tmp_path / "-"), "--json"]) == 0
    assert set(quant.load_file(tmp_path / "-")) == {"w", "b"}


def test_quantize_to_dash_with_a_reader_that_left_exits_quietly(tmp_path):
    # `neuropil quantize IN - | head -c 100`: what the reader read is all it wanted.
    src = _save(tmp_path / "in.safetensors", {"w": np.ones((512, 512), np.float32)})
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "neuropil", "quantize", str(src), "-", "--json"],
                           stdout=write_end, stderr=subprocess.PIPE, timeout=300,
                           cwd=tmp_path)  # fmt: skip
    finally:
        os.close(write_end)
    assert r.returncode == 141 and b"Traceback" not in r.stderr, r.stderr.decode()
    assert os.listdir(tmp_path) == ["in.safetensors"]
