"""Where the tests' data lives: in the repository, so that a clone tests what the README says it tests.

UNIRL_FIXTURES (parity fixture sets), UNIRL_KEYS (checkpoint key lists) and UNIRL_GENEVAL (GenEval data) point the
tests elsewhere. Data that is missing fails the test that needs it, naming the folder: a skipped parity test would
be a silent pass. A module whose fixture family is missing fails at collection (every folder found is a parameter,
and non-parametrized tests use the first), so pytest reports the error and runs nothing: loud, never a skip.
"""
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("UNIRL_FIXTURES") or os.path.join(ROOT, "tests", "fixtures")
KEYS = os.environ.get("UNIRL_KEYS") or os.path.join(ROOT, "tests", "keys")
GENEVAL = os.environ.get("UNIRL_GENEVAL") or os.path.join(ROOT, "data", "geneval")
TOY = os.path.join(ROOT, "assets", "toy")  # the shipped toy checkpoint


def fixture_dirs(prefix):
    """Every fixture folder FIXTURES/prefix*. With none there, fails the calling test module at collection, naming
    the folder and the variable, instead of leaving its tests to skip."""
    found = sorted(d for d in glob.glob(os.path.join(FIXTURES, prefix + "*")) if os.path.isdir(d))
    if not found:
        pytest.fail(f"no {prefix}* fixture folder under {FIXTURES} (tests/fixtures ships them; UNIRL_FIXTURES "
                    "points elsewhere)", pytrace=False)
    return found


def key_file(name):
    """A key list of spec/keys (copied to tests/keys); missing fails, naming the path."""
    path = os.path.join(KEYS, name)
    if not os.path.isfile(path):
        pytest.fail(f"no checkpoint key list {path} (tests/keys ships them; UNIRL_KEYS points elsewhere)",
                    pytrace=False)
    return path


def toy_checkpoint():
    """The shipped toy checkpoint folder (assets/toy, tracked in git); missing fails, naming the path."""
    if not os.path.isfile(os.path.join(TOY, "model.safetensors")):
        pytest.fail(f"no toy checkpoint at {TOY} (the repository ships it; python toy.py pretrain --out assets/toy "
                    "rebuilds it)", pytrace=False)
    return TOY
