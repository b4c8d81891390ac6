"""Corpus stage: real text → fixed-length token contexts (`tokens.parquet`, `corpus.json`)."""

from mechflow.corpus.config import CorpusConfig
from mechflow.corpus.core import contexts_table, pack_contexts, prepare_corpus, read_contexts
from mechflow.corpus.sources import STDLIB_MODULES, stdlib_docs
from mechflow.corpus.tokenizer import TokenizerInfo, load_tokenizer

__all__ = ["CorpusConfig", "STDLIB_MODULES", "TokenizerInfo", "contexts_table", "load_tokenizer", "pack_contexts",
           "prepare_corpus", "read_contexts", "stdlib_docs"]
