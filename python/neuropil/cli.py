"""The ``neuropil`` command line: ``info``, ``data``, ``tour``, ``bench``, ``quantize``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from . import info as _info
from .errors import NeuropilError


class _Patterns(argparse.Action):
    """``--skip PATTERN ...``: adds its patterns to those of earlier ``--skip``'s
    (``--skip=a --skip=b``) and remembers the words it took, for the parser's
    error hint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken: list[str] = []

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        values = list(values or [])
        self.taken += values
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose "arguments are required" error says so when a
    ``--skip`` before the positionals took them as patterns (``--skip a b IN OUT``)."""

    def error(self, message: str) -> NoReturn:
        taken = [w for a in self._actions if isinstance(a, _Patterns) for w in a.taken]
        if taken and "arguments are required" in message:
            words = ", ".join(map(repr, taken))
            message += (
                f" (--skip took every word after it as a pattern: {words}; put input and "
                "output before --skip, end the patterns with --, or write --skip=PATTERN)"
            )
        super().error(message)


def _cmd_info(args: argparse.Namespace) -> int:
    data = _info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    errors = data.pop("errors")
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key in errors:  # a malformed NEUROPIL_* setting: what is wrong with it
            value = f"unusable ({errors[key]})"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        elif key == "torch" and value is None:
            value = "not installed"
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from . import data

    if args.install:
        import subprocess

        try:
            for dist in data.install_missing():
                print(f"installed {dist}")
        except subprocess.CalledProcessError as e:
            # pip has printed its own reason (no network, no such version...) above;
            # a failed install is a system error (exit 1), like an OSError.
            cmd = " ".join(map(str, e.cmd))
            print(f"neuropil: error: `{cmd}` exited with {e.returncode}", file=sys.stderr)
            return 1
    missing = []
    for name, where in data.status().items():
        print(f"{name:<18} {where}")
        if where.startswith("missing"):
            missing.append(name)
    if not missing:
        return 0
    # Scripts (CI, the test command) check the exit status: anything missing
    # is a failure, with or without --install.
    names = ", ".join(missing)
    if args.install:
        print(f"neuropil: error: still missing after --install: {names}", file=sys.stderr)
    else:
        hint = (
            " (run `neuropil data --install`)"
            if any(n in data.INSTALLABLE for n in missing)
            else ""
        )
        print(f"neuropil: error: missing: {names}{hint}", file=sys.stderr)
    return 1


def _cmd_tour(args: argparse.Namespace) -> int:
    from . import _tour

    return _tour.run(only=args.only, as_json=args.json, out_dir=args.out)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    return _bench.run(names=args.names, as_json=args.json, quick=args.quick, quality=args.quality)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import _quant_cli

    return _quant_cli.main(args)


def build_parser() -> argparse.ArgumentParser:
    from . import _bench, _tour

    p = _Parser(
        prog="neuropil",
        description="The neuropil command line: describe the installation, find the real "
        "data, tour every capability, benchmark against baselines, quantize model files.",
    )
    p.add_argument("--version", action="version", version=f"neuropil {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="version, SIMD level, threads, torch/CUDA")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser(
        "data",
        help="where the real data of the tour and tests is (exit 1 if any is missing)",
    )
    s.add_argument(
        "--install",
        action="store_true",
        help="pip-install the missing data packages (pinned versions)",
    )
    s.set_defaults(func=_cmd_data)

    s = sub.add_parser("tour", help="run every capability on real data and report")
    s.add_argument(
        "--only",
        nargs="+",
        metavar="SECTION",
        help=f"sections to run (default: all of {', '.join(_tour.SECTIONS)})",
    )
    s.add_argument(
        "--out", default="neuropil-tour", help="folder for figures (default: %(default)s)"
    )
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=_cmd_tour)

    s = sub.add_parser("bench", help="side-by-side benchmarks against installed baselines")
    s.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(_bench.BENCHES)})",
    )
    s.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    s.add_argument("--json", action="store_true", help="print rows as JSON")
    s.add_argument(
        "--quality", action="store_true", help="also run quality evaluations (e.g. flyhash mAP)"
    )
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("quantize", help="pack a safetensors or GGUF file's weights (2/3/4/8-bit)")
    s.add_argument("input", help="safetensors or GGUF file")
    s.add_argument(
        "output",
        help="safetensors file to write (neuropil.torch.load_quantized); - for stdout "
        "(the report then goes to stderr; ./- names a file '-')",
    )
    s.add_argument(
        "--bits", type=int, default=None, help="2, 3, 4 or 8 (default 4; GGUF schemes: theirs)"
    )
    s.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="32, 64, 128, 256 (default 64; GGUF schemes: 32)",
    )
    s.add_argument("--scheme", default="asym", help="asym, sym, q4_0, q4_1, q8_0")
    s.add_argument("--search", action="store_true", help="error-minimising scale search")
    s.add_argument(
        "--skip",
        nargs="*",
        action=_Patterns,
        metavar="PATTERN",
        help="tensors to keep in float: a glob on the name or on an enclosing module's, "
        "or a name component (for a GGUF input, its own names or the transformers names "
        "they become); a pattern that matches no tensor is an error. Takes every "
        "word up to the next option: put input and output first, end the patterns with --, or "
        "write --skip=PATTERN (repeated --skip's add up)",
    )
    s.add_argument(
        "--min-size",
        type=int,
        default=4096,
        help="smallest tensor to quantize, in elements (default 4096); GGUF blocks already "
        "in the --scheme format are carried over whatever their size",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON (the report goes to stderr when OUT is stdout)",
    )
    s.set_defaults(func=_cmd_quantize)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand. Bad input (a :class:`NeuropilError`) exits with 2, a
    file or system error (an ``OSError``: missing file, permission denied, name
    too long...) with 1, each as one ``neuropil: error:`` line; Ctrl-C with 130
    and one line; a reader of stdout that left (``neuropil info | head -1``)
    with 141, quietly; anything else is a bug and keeps its traceback."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            sys.stdout.flush()  # (--help, --version: a reader that left is seen here)
            raise
        code = _run(args)
        # A pipe's output is buffered: written here, not at exit, where a
        # reader that left would print "Exception ignored ... BrokenPipeError".
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # What the reader read is all it wanted. stdout goes to /dev/null so the
        # flush at exit does not fail again; 141 is the shell's code for a SIGPIPE.
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # (not a file: nothing to flush at exit)
            return 141
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
        return 141


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a bug: no traceback. Savers write a
        # temporary file and remove it on any exception, so a file target is
        # never left half written; a pipe or device target (`-`, /dev/stdout, a
        # named pipe) gets its bytes only at the end, in one copy (`neuropil
        # quantize` converts into a temporary file first), but a copy
        # interrupted midway leaves it a partial file.
        # 130 is the shell's code for a SIGINT.
        print("\nneuropil: interrupted", file=sys.stderr)
        return 130
    except NeuropilError as e:
        print(f"neuropil: error: {e}", file=sys.stderr)
        # (a file error reported with its path keeps the OSError as its cause)
        return 1 if isinstance(e.__cause__, OSError) else 2
    except BrokenPipeError:
        raise  # (see main)
    except OSError as e:
        print(f"neuropil: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
