from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harvest_testlib import write_tokens


@pytest.fixture
def tiny_tokens(tmp_path) -> tuple[Path, np.ndarray]:
    path = tmp_path / "corpus" / "tokens.parquet"
    return path, write_tokens(path)
