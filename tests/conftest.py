"""Shared fixtures: the project root, the venv's console script and the real data folder."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHARED_DATA = Path(os.environ.get("CYBER_MOE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cli() -> str:
    exe = BIN / "cyber-moe"
    assert exe.exists(), f"console script {exe} missing: run `make install`"
    return str(exe)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data folder {SHARED_DATA} not found (expected ../shared/data beside the project)")
    return SHARED_DATA
