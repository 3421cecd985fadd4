"""What every ``save`` promises about the file it replaces, for both atomic
writers: the Python one (``neuropil._safetensors.replacing``: QuantizedWeights,
RangeIndex, NeuronCache, MembraneBank, SlidingWindows) and the Rust one
(``write_atomic``: FlyHash, BinaryIndex).

A save refuses what ``open(path, "wb")`` refuses (a write-protected file, a
path ending in a separator, a loop of symbolic links), keeps the mode of the
file it replaces, is not stopped by a leftover temporary file or a long name,
and syncs the file before renaming it. The permission tests run in a child
process without ``CAP_DAC_OVERRIDE`` (``setpriv``) when the suite runs as root,
so that they run in CI containers too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import HAS_TORCH
from neuropil import FormatError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX files, modes and links")

# Each builds `obj`, whose `save(path)` goes through one of the writers.
SAVERS = {
    "quantize": """
        import numpy as np
        from neuropil.quant import quantize
        obj = quantize(np.ones((4, 64), np.float32))""",
    "flyhash": """
        from neuropil.flyhash import FlyHash
        obj = FlyHash(16, expansion_ratio=4.0, active_fraction=0.1, seed=1)""",
    "binary_index": """
        import numpy as np
        from neuropil.flyhash import BinaryIndex
        obj = BinaryIndex(16)
        obj.add(np.arange(4, dtype=np.uint8).reshape(2, 2))""",
    "range_index": """
        import numpy as np
        from neuropil.range import RangeIndex
        obj = RangeIndex(np.arange(40, dtype=np.float32).reshape(10, 4))""",
    "neuron_cache": """
        from neuropil.neurons import NeuronCache
        obj = NeuronCache(100, capacity=5)""",
    "sliding_windows": """
        import numpy as np
        from neuropil.windows import SlidingWindows
        obj = SlidingWindows(np.ones((20, 3), np.float32), 4)""",
    "membrane_bank": """
        from neuropil.membrane import MembraneBank
        obj = MembraneBank(L=8, H=2, W=2)""",
}
RUST_WRITER = {"flyhash", "binary_index"}
PYTHON_WRITER = set(SAVERS) - RUST_WRITER


def _params(names):
    return [
        pytest.param(
            n,
            marks=pytest.mark.skipif(not HAS_TORCH, reason="needs torch"),
        )
        if n == "membrane_bank"
        else n
        for n in sorted(names)
    ]


WRITERS = _params(SAVERS)


def _save_fn(name):
    scope: dict = {}
    exec(textwrap.dedent(SAVERS[name]), scope)
    return scope["obj"].save


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------- without CAP_DAC_OVERRIDE
_SETPRIV = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
_PROBE = """
import os, sys
p = sys.argv[1] + "/probe"
open(p, "w").close(); os.chmod(p, 0o444)
try:
    open(p, "w")
except PermissionError:
    pass
else:
    print("SKIP: file permissions do not apply to this process"); sys.exit(77)
finally:
    os.unlink(p)
"""


def _unprivileged(code: str, tmp_path: Path) -> str:
    """Runs ``code`` in a child interpreter to which file permissions apply
    (``setpriv`` drops root's overrides); its stdout. Skips where that cannot be had."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions do not apply")
        prefix = _SETPRIV
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir(exist_ok=True)
    full = _PROBE + textwrap.dedent(code)
    r = subprocess.run(
        [*prefix, sys.executable, "-c", full, str(probe_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode == 77:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stderr
    return r.stdout


def _try_save(name: str, path: Path) -> str:
    """Code that saves ``SAVERS[name]``'s object to ``path`` and prints
    ``OK`` or ``type|errno|filename|message`` of what it raised."""
    return textwrap.dedent(SAVERS[name]) + textwrap.dedent(f"""
        try:
            obj.save({str(path)!r})
            print("OK")
        except Exception as e:
            print(type(e).__name__, getattr(e, "errno", None), getattr(e, "filename", None),
                  e, sep="|")
        """)


@pytest.mark.parametrize("name", WRITERS)
def test_a_write_protected_file_is_refused_and_left_as_it_was(name, tmp_path):
    # A rename replaces a file whatever its mode: every save silently
    # overwrote a 0444 file that open(path, "wb") refuses.
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"precious")
    path.chmod(0o444)
    out = _unprivileged(_try_save(name, path), tmp_path).strip()
    kind, code, filename, message = out.split("|", 3)
    assert kind == "PermissionError", out
    assert int(code) == errno.EACCES
    assert filename == str(path)
    assert "not writable" in message, message
    assert path.read_bytes() == b"precious"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", WRITERS)
def test_a_read_only_folder_is_named_in_the_error(name, tmp_path):
    # The file itself is writable: what fails is the temporary file beside it,
    # and the error said the file was not writable.
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "w.safetensors"
    path.write_bytes(b"old")
    folder.chmod(0o555)
    try:
        out = _unprivileged(_try_save(name, path), tmp_path).strip()
    finally:
        folder.chmod(0o755)
    kind, code, filename, message = out.split("|", 3)
    assert kind == "PermissionError", out
    assert int(code) == errno.EACCES
    assert filename == str(folder)
    assert "cannot create a temporary file in this folder" in message, message
    assert "w.safetensors" in message
    assert path.read_bytes() == b"old"


# ----------------------------------------------------------------- file modes
@pytest.mark.parametrize("name", WRITERS)
def test_a_save_keeps_the_mode_of_the_file_it_replaces(name, tmp_path):
    # The Rust writer gave a private 0600 file the default 0644.
    save = _save_fn(name)
    path = tmp_path / "w.safetensors"
    old = os.umask(0o022)
    try:
        save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        for mode in (0o600, 0o640, 0o664):
            path.chmod(mode)
            save(path)
            assert stat.S_IMODE(path.stat().st_mode) == mode, oct(mode)
        other = tmp_path / "new.safetensors"
        os.umask(0o077)
        save(other)
        assert stat.S_IMODE(other.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------- temporary file names
@pytest.mark.parametrize("name", _params(RUST_WRITER))
def test_a_leftover_temporary_file_of_this_pid_does_not_stop_a_save(name, tmp_path):
    # A save killed in an earlier container run with the same pid (1) left
    # `.{name}.{pid}-0.tmp`; the Rust writer's first save of every later
    # process wanted that very name and failed with FileExistsError.
    code = textwrap.dedent(SAVERS[name]) + textwrap.dedent(f"""
        import os
        folder = {str(tmp_path)!r}
        for n in range(3):
            with open(f"{{folder}}/.w.st.{{os.getpid()}}-{{n}}.tmp", "wb") as f:
                f.write(b"partial bytes of a killed save")
        obj.save(folder + "/w.st")
        print(sorted(os.listdir(folder)))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = [n for n in os.listdir(tmp_path) if n != "w.st"]
    assert len(names) == 3  # the leftovers are not this save's to remove
    assert all((tmp_path / n).read_bytes() == b"partial bytes of a killed save" for n in names)
    assert (tmp_path / "w.st").stat().st_size > 100


@pytest.mark.parametrize("name", _params(PYTHON_WRITER))
def test_a_taken_temporary_name_is_skipped(name, tmp_path, monkeypatch):
    # The Python writer draws random names: the first two collide here.
    import secrets

    taken = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n=None: next(taken))
    (tmp_path / ".w.st.aaaaaaaa.tmp").write_bytes(b"leftover")
    _save_fn(name)(tmp_path / "w.st")
    assert (tmp_path / ".w.st.aaaaaaaa.tmp").read_bytes() == b"leftover"
    assert sorted(os.listdir(tmp_path)) == [".w.st.aaaaaaaa.tmp", "w.st"]


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("length", [242, 250, 255])
def test_any_name_open_accepts_can_be_saved(name, length, tmp_path):
    # The temporary name adds ~14 characters: names of 242-255 bytes failed
    # with ENAMETOOLONG though open() takes them.
    save = _save_fn(name)
    stem = "é" * ((length - 12) // 2)  # two bytes each: the cut must keep whole characters
    path = tmp_path / (stem + "n" * (length - len(stem.encode()) - 12) + ".safetensors")
    assert len(path.name.encode()) == length
    with open(path, "wb"):
        pass
    save(path)
    save(path)  # over an existing file too
    assert path.stat().st_size > 100
    assert _leftovers(tmp_path) == []
    longer = tmp_path / ("n" * 256)
    with pytest.raises(OSError) as e:
        save(longer)
    assert e.value.errno == errno.ENAMETOOLONG


# ---------------------------------------------------- what open() would refuse
@pytest.mark.parametrize(
    "name",
    [
        n
        for n in sorted(SAVERS)
        if n != "membrane_bank" or HAS_TORCH
    ],
)
def test_a_path_ending_in_a_separator_is_refused_as_open_refuses_it(name, tmp_path):
    # The Python writers wrote a regular file `newdir` for "newdir/"; the Rust
    # one raised NotADirectoryError. open("newdir/", "wb") raises EISDIR.
    save = _save_fn(name)
    for target, exc in [
        (f"{tmp_path}/newdir/", IsADirectoryError),
        (f"{tmp_path}/", IsADirectoryError),
        (f"{tmp_path}/missing/newdir/", FileNotFoundError),
    ]:
        with pytest.raises(OSError) as opened:
            open(target, "wb")
        with pytest.raises(exc) as saved:
            save(target)
        assert type(saved.value) is type(opened.value), target
        assert saved.value.errno == opened.value.errno
        assert saved.value.filename == target
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        save(f"{tmp_path}/file/sub/")
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("name", WRITERS)
def test_a_loop_of_links_is_refused_as_open_refuses_it(name, tmp_path):
    # open() raises ELOOP; the Python writers replaced the named link with a
    # regular file, the Rust one the other link.
    save = _save_fn(name)
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to("b")
    b.symlink_to("a")
    with pytest.raises(OSError) as saved:
        save(a)
    assert saved.value.errno == errno.ELOOP
    assert saved.value.filename == str(a)
    assert a.is_symlink() and b.is_symlink()
    assert os.readlink(a) == "b" and os.readlink(b) == "a"
    assert _leftovers(tmp_path) == []
    # A chain of links (not a loop) is still followed, a dangling end created.
    (tmp_path / "c").symlink_to("d")
    (tmp_path / "d").symlink_to("sub/e")
    (tmp_path / "sub").mkdir()
    save(tmp_path / "c")
    assert (tmp_path / "c").is_symlink() and (tmp_path / "d").is_symlink()
    assert (tmp_path / "sub" / "e").is_file()


@pytest.mark.parametrize("name", WRITERS)
def test_a_folder_is_not_replaced(name, tmp_path):
    save = _save_fn(name)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        save(tmp_path / "d")
    assert e.value.filename == str(tmp_path / "d")
    assert (tmp_path / "d").is_dir()
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------- fsync
@pytest.mark.parametrize("name", _params(PYTHON_WRITER))
def test_the_python_writer_syncs_the_file_before_renaming_it(name, tmp_path, monkeypatch):
    # A crash after the rename but before the data reached the disk could leave
    # an empty file where the old one was (the Rust writer synced; this one didn't).
    events: list[tuple[str, int]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    _save_fn(name)(tmp_path / "w.st")
    ino = (tmp_path / "w.st").stat().st_ino
    assert ("replace", ino) in events
    assert ("fsync", ino) in events[: events.index(("replace", ino))]


# ----------------------------------------------------------- FlyHash.load size
def _tampered_flyhash(tmp_path: Path, expansion_ratio: float, consistent: bool) -> Path:
    from neuropil.flyhash import FlyHash

    src = tmp_path / "fh.st"
    FlyHash(16, expansion_ratio=4.0, active_fraction=0.1, seed=1, projection="sign").save(src)
    blob = src.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    meta = header["__metadata__"]
    meta["input_dim"] = "4096"
    meta["expansion_ratio"] = repr(expansion_ratio)
    if consistent:  # what the configuration gives: only the tensor can tell
        m = int(4096 * expansion_ratio)
        meta["output_dim"], meta["active_bits"] = str(m), str(int(m * 0.1))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out = tmp_path / "big.st"
    out.write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n :])
    return out


@pytest.mark.parametrize("consistent", [False, True])
def test_a_tampered_flyhash_file_is_refused_before_its_projection_is_built(consistent, tmp_path):
    # An ~860-byte file claiming a 2 GB sign projection: load generated it
    # before looking at the stored tensor, and under a memory limit the
    # process aborted ("memory allocation of ... failed").
    path = _tampered_flyhash(tmp_path, 1000.0, consistent)
    assert path.stat().st_size < 1000
    code = textwrap.dedent(f"""
        import resource, time
        resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
        from neuropil import FormatError
        from neuropil.flyhash import FlyHash
        t = time.perf_counter()
        try:
            FlyHash.load({str(path)!r})
        except FormatError as e:
            print("FormatError", round(time.perf_counter() - t, 3), e)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert r.stdout.startswith("FormatError"), r.stdout
    seconds = float(r.stdout.split()[1])
    assert seconds < 0.1, r.stdout
    want = "sign_bits" if consistent else "output_dim/active_bits"
    assert want in r.stdout, r.stdout


def test_a_tampered_flyhash_file_within_limits_is_still_a_format_error(tmp_path):
    from neuropil.flyhash import FlyHash

    for consistent in (False, True):
        with pytest.raises(FormatError, match=r"big\.st"):
            FlyHash.load(_tampered_flyhash(tmp_path, 2.0, consistent))
