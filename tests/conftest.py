"""Shared fixtures and markers for the neuropil test suite."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_collection_modifyitems(config, items):
    cuda = False
    if HAS_TORCH and any("cuda" in item.keywords for item in items):
        import torch

        cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not cuda:
            item.add_marker(skip)


def run_python(
    code: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (for import-time and env-var behaviour)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout
    )


@pytest.fixture
def restore_threads():
    import neuropil

    before = neuropil.get_num_threads()
    yield
    neuropil.set_num_threads(before)


# Real models, loaded once per test session (SmolLM2 takes ~20 s on a CPU).
# Missing data fails loudly rather than skipping: run `neuropil data --install`.
@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, eval mode."""
    from neuropil.data import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 as a SentenceTransformer on the CPU."""
    from neuropil.data import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def sentences():
    """Several hundred real English sentences."""
    from neuropil.data import real_sentences

    return real_sentences(400)


def assert_saves_take_normal_modes(save, path, kept=(0o664,)):
    """``save(path)`` under umask 0o027 creates a 0o640 file (what ``open``
    gives, not mkstemp's 0o600), and a save over an existing file keeps each
    mode of ``kept``."""
    import stat

    if os.name != "posix":
        pytest.skip("POSIX file modes")
    old = os.umask(0o027)
    try:
        save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    for mode in kept:
        path.chmod(mode)
        save(path)
        assert stat.S_IMODE(path.stat().st_mode) == mode


def unpickle_tampered(obj, state):
    """``pickle.loads`` of ``obj``'s pickle with its state replaced (a tampered pickle)."""
    import pickle

    class Tampered:
        def __reduce__(self):
            return (object.__new__, (type(obj),), state)

    return pickle.loads(pickle.dumps(Tampered()))


def read_pipe(path):
    """Makes ``path`` a named pipe and starts a daemon thread reading it to the
    end; returns ``(thread, chunks)``: after ``thread.join()``, ``chunks`` holds
    the one ``bytes`` read (empty while the writer has not closed)."""
    import threading

    os.mkfifo(path)
    chunks: list[bytes] = []
    thread = threading.Thread(target=lambda: chunks.append(path.read_bytes()), daemon=True)
    thread.start()
    return thread, chunks
