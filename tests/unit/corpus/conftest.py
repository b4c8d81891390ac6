from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def smollm2_cfg() -> dict:
    """The shipped SmolLM2 model config (its BOS convention)."""
    return yaml.safe_load((ROOT / "config/model/smollm2_135m.yaml").read_text())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_cfg):
    """Only SmolLM2's tokenizer (a few seconds), never the model."""
    from mechflow.corpus import load_tokenizer

    return load_tokenizer(smollm2_cfg)
