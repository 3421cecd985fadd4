"""``python -m neuropil``: the same CLI as the ``neuropil`` console script."""

from .cli import main

raise SystemExit(main())
