"""Prosody's own upstream MAM scansion cases, replayed against a real server (reference §8).

The .scs files are verbatim copies in tests/e2e/scansion/ (see README.md and PROVENANCE.md
there). tests/e2e/scansion.py runs them; its docstring gives the matching rules.

Server config. Each case gets a fresh server with the harness's config (conftest.py), plus the
lines of upstream spec/scansion/prosody.cfg.lua that matter for these cases:
storage = "memory", mam_smart_enable = true, insecure authentication (any user and password are
accepted, and every user exists, so chat messages to someone@localhost go to offline storage
instead of bouncing), and plaintext PLAIN auth. For mod_mam_rs the same lines apply. It keeps its
own SQLite archive whatever `storage` says; `mam_smart_enable = true` is the line that matters.
What the upstream config adds beyond these (pep, vcard, muc_mam on conference.localhost, HTTP
upload, ...) is not used by these cases. test_upstream_config_has_these_lines checks that the
copied config still says what we replicate.

Stamps. Two variants of mam_extended exist:
- mam_extended.0.12.scs (0.12 branch) expects the literal stamp 2008-08-22T21:09:04Z for every
  delay and metadata timestamp. The 0.12 config makes this true by replacing os.time() (and
  util.time) inside Prosody. We run it only against stock mod_mam on Prosody 0.12, with the mock
  block copied out of prosody.cfg.0.12.lua. It cannot apply to mod_mam_rs: its stamps come from
  the Rust clock, with microseconds (as Prosody 13 does), so no Lua mock can fix them. It would
  also be wrong to stamp a faked time.
- mam_extended.scs (trunk/13.0) runs unmocked. It writes `{scansion:capture:...}` for ids and
  stamps: any value, remembered (see scansion.py for why a capture does not compare). This is the
  variant for mod_mam_rs, and it runs against stock too. Beyond what scansion checks,
  test_mam_extended then checks what the captures were clearly meant to show, labelled as our
  own addition: the metadata start/end ids are the ids of the first and last result, and the
  stamps are equal. That holds for any stamp precision, because the metadata and the results
  report the same stored item.

Both modules pass everything that applies to them: stock (MAM_MODULE=mam) runs all three cases.
mod_mam_rs runs mam_prefs_prep and the trunk mam_extended. Before mod_mam_rs had prefs, metadata
and mam_smart_enable, it failed at the first `<prefs>` reply.
"""

import os
import re
import shutil
from pathlib import Path

import pytest

import scansion
from conftest import MAM_MODULE, REPO

CASES = Path(__file__).resolve().parent / "scansion"
SHARED = REPO.parent / "shared" / "scansion-cases" / "prosody-upstream"
COPIED = ("PROVENANCE.md", "mam_extended.scs", "mam_extended.0.12.scs", "mam_prefs_prep.scs",
          "prosody.cfg.lua", "prosody.cfg.0.12.lua")
TIMEOUT = float(os.environ.get("MAM_E2E_SCANSION_TIMEOUT", "10"))

# The lines of upstream prosody.cfg.lua these cases depend on (checked below against the copy).
UPSTREAM_LINES = [
    'storage = "memory"',
    "mam_smart_enable = true",
    'authentication = "insecure"',
    'insecure_open_authentication = "Yes please, I know what I\'m doing!"',
    "c2s_require_encryption = false",
    "allow_unencrypted_plain_auth = true",
]


def prosody_version():
    """The version of the `prosody` the tests run (the first on PATH): its CFG_SOURCEDIR's
    prosody.version."""
    exe = shutil.which("prosody")
    if exe:
        m = re.search(r"^CFG_SOURCEDIR\s*=\s*'([^']+)'", Path(exe).read_text(errors="replace"), re.M)
        if m and (Path(m.group(1)) / "prosody.version").exists():
            return (Path(m.group(1)) / "prosody.version").read_text().strip()
    return None


def mock_time_block_0_12():
    """The `-- Mock time functions` block of prosody.cfg.0.12.lua, verbatim (up to `admins =`)."""
    text = (CASES / "prosody.cfg.0.12.lua").read_text()
    start = text.index("-- Mock time functions")
    end = text.index("\nadmins", start)
    block = text[start:end].rstrip()
    assert "function _G.os.time()" in block and "1219439344" in block, block
    return block.splitlines()


def run_case(make_server, name, extra=()):
    srv = make_server(UPSTREAM_LINES + list(extra), users=())
    return scansion.run_script(CASES / name, "127.0.0.1", srv.port, timeout=TIMEOUT)


# --------------------------------------------------------------------------


def test_copies_match_shared():
    if not SHARED.is_dir():
        pytest.skip("%s not present (CI checkout without ../shared); the copies are used" % SHARED)
    for name in COPIED:
        assert (CASES / name).read_bytes() == (SHARED / name).read_bytes(), \
            "tests/e2e/scansion/%s differs from %s; re-copy it verbatim" % (name, SHARED / name)


def test_upstream_config_has_these_lines():
    for cfg in ("prosody.cfg.lua", "prosody.cfg.0.12.lua"):
        lines = {l.strip() for l in (CASES / cfg).read_text().splitlines()}
        for want in UPSTREAM_LINES:
            assert want in lines, "%s no longer has %r" % (cfg, want)
        assert any(l.startswith('"mam";') for l in lines), "%s no longer enables mod_mam" % cfg


def test_mam_prefs_prep(make_server):
    """Prefs set with upper-case JIDs: the reply has them JID-prepped, default="roster" kept."""
    run_case(make_server, "mam_prefs_prep.scs")


def test_mam_extended(make_server):
    """Trunk mam_extended.scs: prefs, 2 messages, metadata, plain query, flip-page query."""
    result = run_case(make_server, "mam_extended.scs")
    # Our addition (not a scansion rule): the capture names say metadata <start>/<end> are the
    # first/last archived items. The first query's results are chat01 then chat02, in that order.
    by_step = {}  # receives step -> {name: value}, in script order
    for k, v, step in result.captures:
        by_step.setdefault(step.lineno, {})[k] = v
    meta, r1, r2 = list(by_step.values())[:3]  # the <metadata/> reply, then query 1's two results
    assert (r1["first"], r1["start"]) == (meta["first"], meta["start"]), \
        "metadata <start> is not the first result: %r vs %r" % (meta, r1)
    assert (r2["last"], r2["end"]) == (meta["last"], meta["end"]), \
        "metadata <end> is not the last result: %r vs %r" % (meta, r2)


@pytest.mark.skipif(MAM_MODULE != "mam", reason="needs Prosody's clock mocked; only meaningful for stock "
                    "mod_mam (mod_mam_rs stamps with the Rust clock); see the module docstring")
def test_mam_extended_0_12_mocked_clock(make_server):
    """0.12 mam_extended.scs with the 0.12 config's os.time()/util.time mock: literal stamps."""
    version = prosody_version()
    if not (version or "").startswith("0.12"):
        pytest.skip("the 0.12 variant is for Prosody 0.12 (this is %s)" % version)
    run_case(make_server, "mam_extended.0.12.scs", mock_time_block_0_12())
