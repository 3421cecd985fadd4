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
        out[row] = counts / max(np.linalg.norm(counts), 1.0)
    return names, out
