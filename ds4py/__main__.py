"""`python -m ds4py ...`: the same entry point as the `ds4py` console script (see cli.py)."""

from ds4py.cli import main

raise SystemExit(main())
