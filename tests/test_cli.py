"""The ``neuropil`` command line, run as users run it (console script and -m)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import neuropil
from neuropil import cli


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
