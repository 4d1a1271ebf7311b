"""Shared test fixtures. Real assets live in ../shared/assets (relative to the project root)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = (ROOT / ".." / "shared" / "assets").resolve()


@pytest.fixture
def assets() -> Path:
    """Path of the real third-party assets; skips the test when they are absent."""
    if not (ASSETS / "models").is_dir():
        pytest.skip(f"real assets not found at {ASSETS} (../shared/assets)")
    return ASSETS
