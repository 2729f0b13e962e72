#!/usr/bin/env python3
"""`make bench-instr`: instructions Prosody executes per archived message, under valgrind's
callgrind, stock mod_mam, mod_mam_rs and no archive module (tests/e2e/bench/instr.py). Not a
pytest module."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.instr import main  # noqa: E402

sys.exit(main())
