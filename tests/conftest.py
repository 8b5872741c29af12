"""Shared test set-up: deterministic seeds and a fixed thread count."""

import sys
from pathlib import Path

import pytest
import torch

# Tests import small helper modules (tolerances, cli_helpers) that live beside them.
sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
