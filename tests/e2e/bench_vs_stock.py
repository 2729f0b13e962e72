#!/usr/bin/env python3
"""`make bench`: stock mod_mam (storage = "sql", SQLite), mod_mam_rs, an in-memory reference module
and Prosody with no archive module, side by side in one run, reported as ratios.

Not a pytest module. Run from anywhere:

    .venv/bin/python tests/e2e/bench_vs_stock.py                      # quick mode (50k-message archive)
    .venv/bin/python tests/e2e/bench_vs_stock.py --rows 1000000       # the record
    .venv/bin/python tests/e2e/bench_vs_stock.py --help               # every knob

The work is in tests/e2e/bench/ (run.py describes the phases); results go to
benches/results/<date>/ and benches/results/latest.*.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
