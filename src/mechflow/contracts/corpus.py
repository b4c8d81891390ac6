"""``corpus.json``: what the corpus stage packed into ``tokens.parquet`` (layout: `contracts.parquet`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from mechflow.contracts.documents import VersionedDocument


class CorpusManifest(VersionedDocument):
    """``corpus.json`` (written by ``prepare_corpus`` after ``tokens.parquet``)."""

    corpus: str = Field(description="corpus config name")
    source: str = Field(description="stdlib_docs | python_docstrings | text_files | jsonl | hf_dataset")
    source_detail: dict[str, Any] = Field(description="what identifies the source (versions, paths, dataset)")
    n_docs: int = Field(description="documents that contributed tokens")
    n_contexts: int
    n_tokens: int = Field(description="n_contexts x context_size (BOS included)")
    context_size: int
    prepend_bos: bool
    bos_token_id: int | None
    separator_token_id: int = Field(description="token between consecutive documents")
    separator_token: str
    bos_handling: str
    tokenizer: str
    tokens_sha256: str = Field(description="sha256 of tokens.parquet")
    text_sha256: str = Field(description="sha256 over the used documents, each UTF-8 + NUL")
    config_hash: str
