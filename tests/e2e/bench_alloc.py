#!/usr/bin/env python3
"""`make bench-alloc`: Lua heap allocated per archived message, stock mod_mam, mod_mam_rs and no
archive module (tests/e2e/bench/alloc.py). Not a pytest module."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.alloc import main  # noqa: E402

sys.exit(main())
