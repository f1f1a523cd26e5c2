"""Shared test fixtures: paths to the real MovieLens files (tests skip when they are absent)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real MovieLens files not found in {SHARED_DATA}")
    return SHARED_DATA
