"""The README's Python examples, run as written on real data and the real model.

Every fenced ```python block of README.md is one test, executed in a fresh
temporary directory. Names a block uses but does not define (``frames``,
``model``, ``keys``...) are filled in with real objects: scikit-learn's digit
images, SmolLM2-135M (a copy, as the examples modify it in place), its layer-0
projections and FFN inputs on the GPL-3 text. After a block, the claims its
comments make are checked where that is cheap.

The ``>>>`` examples of the package's docstrings run too (doctest), each module's
in a namespace of its own: an example must import what it uses.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


class _Namespace(dict):
    """Globals of a README block: a name the block reads before defining it comes
    from ``providers`` (built on first use); any other unknown name falls
    through to the builtins and, failing those, raises ``NameError``."""

    def __init__(self, providers: dict[str, Callable[[], Any]]) -> None:
        super().__init__(__name__="__readme__")
        self.providers = providers

    def __missing__(self, name: str) -> Any:
        if name not in self.providers:
            raise KeyError(name)
        self[name] = value = self.providers[name]()
        return value


# ---------------------------------------------------------------- real inputs

# Tokens of the GPL-3 text run through SmolLM2: keys for the first N_KEYS,
# new_keys for the next N_NEW, the FFN inputs of all of them.
N_KEYS, N_NEW = 256, 64


@pytest.fixture(scope="module")
def layer0(smollm2) -> dict[str, Any]:
    """SmolLM2 layer 0 on real text: its FFN weights, FFN inputs, key and query
    projections (first kv head and first query head, 64 dims)."""
    import torch

    from neuropil.data import gpl3_text

    model, tok = smollm2
    layer = model.model.layers[0]
    ids = tok(gpl3_text(), return_tensors="pt")["input_ids"][:, : N_KEYS + N_NEW]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0])),
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o)),
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    head = model.config.head_dim
    mlp = layer.mlp
    return {
        "ids": ids,
        "h": seen["h"][0].float().numpy().copy(),  # (n, 576)
        "k": seen["k"][0, :, :head].float().numpy().copy(),  # (n, 64)
        "q": seen["q"][0, :, :head].float().numpy().copy(),  # (n, 64)
        "gate": mlp.gate_proj.weight.detach().numpy().copy(),  # (1536, 576)
        "up": mlp.up_proj.weight.detach().numpy().copy(),  # (1536, 576)
        "down": mlp.down_proj.weight.detach().numpy().copy(),  # (576, 1536)
    }


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits as (N, 64) float32 frames, cut into
    episodes of 40 to 200 frames, with each frame's digit as its action."""
    from sklearn.datasets import load_digits

    d = load_digits()
    frames = np.ascontiguousarray(d.images.reshape(len(d.images), -1), dtype=np.float32)
    rng = np.random.default_rng(0)
    lengths: list[int] = []
    while sum(lengths) < len(frames):
        lengths.append(int(rng.integers(40, 201)))
    lengths[-1] -= sum(lengths) - len(frames)
    if lengths[-1] < 32:  # too short for a window and its target: merge
        last = lengths.pop()
        lengths[-1] += last
    return frames, np.asarray(lengths), d.target.astype(np.int64)


class TrainStep:
    """Records the batches it gets; asserts their shapes."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.sizes: list[int] = []

    def __call__(self, frames: Any, action: Any) -> None:
        b = frames.shape[0]
        assert tuple(frames.shape) == (b, 30, self.dim)
        assert tuple(action.shape) == (b,)
        assert 1 <= b <= 256
        self.sizes.append(b)


def _providers(request: pytest.FixtureRequest) -> dict[str, Callable[[], Any]]:
    """Factories of the objects a README block may take from the text around it."""

    def fixture(name: str) -> Any:
        return request.getfixturevalue(name)

    def torch_data(name: str) -> Any:
        import torch.utils.data

        return getattr(torch.utils.data, name)

    def model() -> Any:
        # Every example that takes a model changes it in place.
        return copy.deepcopy(fixture("smollm2")[0])

    def inputs() -> Any:
        from neuropil.data import real_sentences

        tok = fixture("smollm2")[1]
        return tok(" ".join(real_sentences(3)), return_tensors="pt")

    def layer(key: str, rows: slice = slice(None)) -> Callable[[], Any]:
        return lambda: fixture("layer0")[key][rows]

    def thresholds() -> np.ndarray:
        # Each query's 90th-percentile score: about a tenth of the keys match.
        l0 = fixture("layer0")
        scores = l0["q"][-8:] @ l0["k"][:N_KEYS].T
        return np.quantile(scores, 0.9, axis=1).astype(np.float32)

    def active_mask() -> np.ndarray:
        # The neurons of layer 0 that fire above the median |silu(gate x)|.
        l0 = fixture("layer0")
        pre = l0["h"] @ l0["gate"].T
        act = np.abs(pre / (1 + np.exp(-pre)))
        return act > np.median(act)

    digits: dict[str, Any] = {}

    def digit(i: int) -> Callable[[], Any]:
        return lambda: (digits.setdefault("d", _digits()))[i]

    return {
        "np": lambda: np,
        "neuropil": lambda: __import__("neuropil"),
        "frames": digit(0),
        "episode_lengths": digit(1),
        "actions": digit(2),
        "rank": lambda: 0,
        "world": lambda: 1,
        "train_step": lambda: TrainStep(64),
        "DataLoader": lambda: torch_data("DataLoader"),
        "DistributedSampler": lambda: torch_data("DistributedSampler"),
        "model": model,
        "inputs": inputs,
        "keys": layer("k", slice(0, N_KEYS)),
        "new_keys": layer("k", slice(N_KEYS, None)),
        "queries": layer("q", slice(-8, None)),
        "thresholds": thresholds,
        "gate_w": layer("gate"),
        "up_w": layer("up"),
        "down_w": layer("down"),
        "hidden_states": layer("h"),
        "x": layer("h", slice(-4, None)),
        "active_mask": active_mask,
        "input_ids": lambda: fixture("layer0")["ids"][:, :64],
    }


# ---------------------------------------------------------------- per-block checks
# Keyed by a call that identifies the block; each gets the namespace after the
# block ran and what it printed.


def _check_usage(ns: dict[str, Any], out: str) -> None:
    assert ns["neuropil"].dot(ns["a"], ns["a"]) == pytest.approx(float(ns["a"] @ ns["a"]), rel=1e-4)
    assert "b must have shape (1048576,) to match a; got (1048575,)" in out


def _check_membrane(ns: dict[str, Any], out: str) -> None:
    psnr_db, recall = out.split("\n")[:2]
    assert float(psnr_db) >= 100  # "exact up to round-off"
    assert 0 < float(recall.removeprefix("tensor(").removesuffix(")")) <= 1
    assert Path("bank.safetensors").is_file()
    assert tuple(ns["keys"].shape) == tuple(ns["nearest"].shape) == (128,)


def _check_windows(ns: dict[str, Any], out: str) -> None:
    sw, step = ns["sw"], ns["train_step"]
    per_epoch = -(-len(sw) // 256)
    assert len(step.sizes) == 3 * per_epoch
    assert step.sizes[0] == 256
    assert sum(step.sizes) == 3 * len(sw)
    batch = next(iter(ns["loader"]))
    assert tuple(batch["frames"].shape) == (256, 30, sw.dim)
    assert tuple(batch["action"].shape) == (256,)
    assert len(type(sw).load("frames.safetensors")) == len(sw)


def _check_flyhash(ns: dict[str, Any], out: str) -> None:
    sparse, codes = ns["sparse"], ns["codes"]
    assert sparse.shape == (1000, 4992) and sparse.dtype == np.float32
    assert ((sparse != 0).sum(1) == 249).all()
    assert codes.shape == (1000, 624) and codes.dtype == np.uint8
    assert ns["ids"].shape == (5, 10)
    assert Path("fh.safetensors").is_file() and Path("index.safetensors").is_file()


def _check_quant(ns: dict[str, Any], out: str) -> None:
    assert ns["q"].bits_per_weight == 4.5
    assert ns["y"].shape == (4096,)
    from neuropil.torch import QuantizedLinear

    model = ns["model"]
    assert isinstance(model.model.layers[0].mlp.gate_proj, QuantizedLinear)
    assert not isinstance(model.lm_head, QuantizedLinear)


def _check_range(ns: dict[str, Any], out: str) -> None:
    lims, ids = ns["lims"], ns["ids"]
    assert lims.shape == (len(ns["queries"]) + 1,) and lims[-1] == len(ids) > 0
    assert ns["ids_k"].shape == (len(ns["queries"]), 10)
    assert len(ns["index"]) == N_KEYS + N_NEW
    summary = ns["cache"].summary()
    assert summary["steps"] >= 1 and 0 < summary["fraction_read"] <= 1


def _check_neurons(ns: dict[str, Any], out: str) -> None:
    from neuropil.torch import SparseMLP

    assert ns["y"].shape == ns["x"].shape
    assert 0 <= float(out.strip().splitlines()[-1]) <= 1  # the hit rate
    stats = ns["teal"].stats()  # "reads ~60% of the weights"
    assert 0.45 < stats["input_density"] < 0.75 and 0.45 < stats["hidden_density"] < 0.75
    assert isinstance(ns["model"].model.layers[0].mlp, SparseMLP)


CHECKS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "neuropil.dot(": _check_usage,
    "MembraneBank(": _check_membrane,
    "SlidingWindows(": _check_windows,
    "FlyHash(": _check_flyhash,
    "quantize(w": _check_quant,
    "RangeIndex(": _check_range,
    "SparseFFN(": _check_neurons,
}


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 7, "README.md lost its ```python examples"
    for marker in CHECKS:  # each check below still finds its example
        assert sum(marker in b for b in BLOCKS) == 1, f"no single README example with {marker!r}"


def _block_id(i: int) -> str:
    return f"{i}:{BLOCKS[i].strip().splitlines()[0]}"


@pytest.mark.slow  # Python-level examples: the scalar-kernel pass adds nothing
@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=_block_id)
def test_readme_example_runs(i, request, tmp_path, monkeypatch, capsys, restore_threads):
    src = BLOCKS[i]
    ns = _Namespace(_providers(request))
    monkeypatch.chdir(tmp_path)
    exec(compile(src, f"README.md python block {i}", "exec"), ns, ns)
    out = capsys.readouterr().out
    for marker, check in CHECKS.items():
        if marker in src:
            check(ns, out)


# ---------------------------------------------------------------- docstring examples

PACKAGE = Path(__import__("neuropil").__file__).resolve().parent
# Every module of the package with a ``>>>`` example (found in the source, so
# modules without one, e.g. neuropil.hf, are not imported).
DOCTEST_MODULES = sorted(
    ".".join(("neuropil", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if ">>> " in p.read_text(encoding="utf-8")
)


def test_docstring_examples_are_collected():
    # neuropil.windows' example used names it never defined, and no test ran it.
    assert {"neuropil.windows", "neuropil.flyhash", "neuropil.neurons"} <= set(DOCTEST_MODULES)


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run_as_written(name, tmp_path, monkeypatch, restore_threads):
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # neuropil.membrane needs torch, an optional extra
        if e.name != "torch":
            raise
        pytest.skip(f"{name} needs torch")
    monkeypatch.chdir(tmp_path)
    # globs={}: not the module's globals, which would hide a missing import.
    result = doctest.testmod(
        module, globs={}, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {name}'s docstring examples fail (see stdout)"
