import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """Only SmolLM2's tokenizer (a few seconds), never the model."""
    from mechflow.corpus import load_tokenizer

    return load_tokenizer({"name": "smollm2_135m", "prepend_bos": True, "bos_token": None})
