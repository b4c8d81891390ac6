"""Corpus stage: real text → fixed-length token contexts (`tokens.parquet`) + `corpus.json`.

1. Read documents from the configured source (see ``mechflow.corpus.sources``).
2. Tokenize them (no special tokens) and concatenate into one stream with a separator token
   between consecutive documents (never before the first or after the last): with
   ``separator: bos`` (default) the model's BOS (``model.bos_token``; for SmolLM2 ``<|endoftext|>``,
   its pretraining document separator), so every document starts the way every prompt does;
   with ``separator: eos`` (or when ``prepend_bos`` is off) the tokenizer's EOS.
3. Cut the stream into contexts of ``context_size`` tokens. With ``model.prepend_bos`` every
   context is ``[BOS] + next context_size-1 stream tokens``, so each context starts like a prompt
   of ``mechflow.models.LoadedModel.to_tokens``; without it, ``context_size`` stream tokens.
   The final partial context is dropped. At most ``max_tokens // context_size`` contexts are kept,
   so the total token count (BOS included) never exceeds ``max_tokens``.
4. Write ``tokens.parquet`` (``CORPUS_SCHEMA``) atomically, then ``corpus.json`` (``CorpusManifest``).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mechflow.contracts.corpus import CorpusManifest
from mechflow.contracts.documents import write_document
from mechflow.contracts.parquet import CORPUS_SCHEMA
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.corpus import sources
from mechflow.corpus.config import CorpusConfig
from mechflow.corpus.tokenizer import TokenizerInfo, load_tokenizer
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_path, canonical_hash, sha256_file

log = logging.getLogger(__name__)

_TOKENIZE_BATCH = 256  # documents per fast-tokenizer call: amortises the Rust call overhead


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Documents of the configured source, in their stable order."""
    if cfg.source == "stdlib_docs":
        return sources.stdlib_docs()
    if cfg.source == "python_docstrings":
        return sources.python_docstrings(list(cfg.packages))
    if cfg.source == "text_files":
        return sources.text_files(list(cfg.paths))
    if cfg.source == "jsonl":
        return sources.jsonl(list(cfg.paths), cfg.text_field)
    return sources.hf_dataset(cfg.hf_name, cfg.hf_split, cfg.text_field, cfg.hf_config)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def pack_contexts(documents: Iterable[str], tokenizer: Any, *, context_size: int, max_tokens: int,
                  prepend_bos: bool, bos_token_id: int | None, separator_token_id: int) -> tuple[np.ndarray, dict]:
    """Tokenize and pack `documents` into an ``(n_contexts, context_size)`` int32 array.

    Returns the array and stats: ``n_docs`` (documents that contributed tokens), ``text_sha256``
    (sha256 over those documents, each UTF-8 encoded and followed by a NUL byte).
    """
    if prepend_bos and bos_token_id is None:
        raise DataError("model.prepend_bos is set but the tokenizer has no BOS token; set model.bos_token")
    body = context_size - 1 if prepend_bos else context_size
    max_contexts = max_tokens // context_size
    needed = max_contexts * body  # stream tokens that fill every allowed context
    stream: list[int] = []
    n_docs = 0
    text_hash = hashlib.sha256()
    for batch in _batched(documents, _TOKENIZE_BATCH):
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for text, ids in zip(batch, encoded):
            if len(stream) >= needed:
                break
            if not ids:
                continue
            if stream:
                stream.append(separator_token_id)
            stream.extend(ids)
            n_docs += 1
            text_hash.update(text.encode("utf-8") + b"\x00")
        if len(stream) >= needed:
            break
    n_contexts = min(max_contexts, len(stream) // body)
    if n_contexts == 0:
        raise DataError(
            f"the corpus has only {len(stream)} tokens, fewer than one context of {context_size}; "
            f"add text or lower corpus.context_size"
        )
    text = np.asarray(stream[: n_contexts * body], dtype=np.int32).reshape(n_contexts, body)
    if prepend_bos:
        text = np.concatenate([np.full((n_contexts, 1), bos_token_id, dtype=np.int32), text], axis=1)
    return text, {"n_docs": n_docs, "text_sha256": text_hash.hexdigest()}


def contexts_table(contexts: np.ndarray) -> pa.Table:
    """`CORPUS_SCHEMA` table of an ``(n_contexts, context_size)`` int array."""
    n, width = contexts.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    tokens = pa.ListArray.from_arrays(offsets, pa.array(contexts.reshape(-1).astype(np.int32)))
    return pa.Table.from_arrays([pa.array(np.arange(n, dtype=np.int64)), tokens], schema=CORPUS_SCHEMA)


def read_contexts(tokens: Path) -> np.ndarray:
    """Read `tokens.parquet` back as an ``(n_contexts, context_size)`` int64 array (validated)."""
    try:
        table = pq.read_table(tokens)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{tokens}: not a readable Parquet file ({exc}); rerun the corpus stage") from exc
    if table.schema.names != CORPUS_SCHEMA.names:
        raise DataError(f"{tokens}: columns {table.schema.names} != {CORPUS_SCHEMA.names}; rerun the corpus stage")
    ids = table.column("context_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise DataError(f"{tokens}: context_id must be 0..n-1 in order; rerun the corpus stage")
    lists = table.column("tokens").combine_chunks()
    lengths = np.diff(lists.offsets.to_numpy())
    if len(lengths) == 0 or np.any(lengths != lengths[0]):
        raise DataError(f"{tokens}: contexts are empty or of different lengths; rerun the corpus stage")
    return lists.flatten().to_numpy().astype(np.int64).reshape(len(ids), int(lengths[0]))


def prepare_corpus(cfg: CorpusConfig | Mapping[str, Any], *, model_cfg: dict, tokens: Path, corpus_manifest: Path,
                   tokenizer_info: TokenizerInfo | None = None) -> dict:
    """Build the token contexts of one corpus for one model's tokenizer.

    Args:
        cfg: the `corpus` config group, typed (``CorpusConfig``; a mapping is validated into one).
        model_cfg: the `model` config group (name, prepend_bos, bos_token).
        tokens: output `tokens.parquet`.
        corpus_manifest: output `corpus.json`.
        tokenizer_info: an already loaded tokenizer; default loads only the model's tokenizer.

    Returns:
        The dict written to `corpus.json`.
    """
    from mechflow.models import ModelConfig  # the model group's class defaults

    ccfg, mcfg = CorpusConfig.from_dict(cfg), ModelConfig.from_dict(model_cfg)
    if mcfg.n_ctx is not None and ccfg.context_size > mcfg.n_ctx:  # the harvest could not run these contexts
        raise ConfigError(f"corpus.context_size: {ccfg.context_size} tokens exceed the context of {mcfg.name} "
                          f"(model.n_ctx = {mcfg.n_ctx}); lower it, e.g. corpus.context_size={min(mcfg.n_ctx, 128)}")
    tok = tokenizer_info or load_tokenizer(model_cfg)
    prepend_bos = mcfg.prepend_bos
    contexts, stats = pack_contexts(
        iter_documents(ccfg), tok.tokenizer, context_size=ccfg.context_size, max_tokens=ccfg.max_tokens,
        prepend_bos=prepend_bos, bos_token_id=tok.bos_token_id,
        separator_token_id=tok.separator_id(ccfg.separator, prepend_bos),
    )
    tokens, corpus_manifest = Path(tokens), Path(corpus_manifest)
    with atomic_path(tokens) as tmp:
        pq.write_table(contexts_table(contexts), tmp, compression="zstd")
    summary = {
        "schema_version": SCHEMA_VERSION,
        "corpus": ccfg.name,
        "source": ccfg.source,
        "source_detail": _source_detail(ccfg),
        "n_docs": stats["n_docs"],
        "n_contexts": int(contexts.shape[0]),
        "n_tokens": int(contexts.size),
        "context_size": ccfg.context_size,
        "prepend_bos": prepend_bos,
        "bos_token_id": tok.bos_token_id if prepend_bos else None,
        "separator_token_id": tok.separator_id(ccfg.separator, prepend_bos),
        "separator_token": tok.tokenizer.convert_ids_to_tokens(tok.separator_id(ccfg.separator, prepend_bos)),
        "bos_handling": ("every context starts with BOS followed by context_size-1 text tokens" if prepend_bos
                         else "no BOS: every context holds context_size text tokens"),
        "tokenizer": tok.name,
        "tokens_sha256": sha256_file(tokens),
        "text_sha256": stats["text_sha256"],
        "config_hash": corpus_config_hash(ccfg, model_cfg),
    }
    write_document(corpus_manifest, CorpusManifest, summary)
    log.info("corpus %s: %d docs → %d contexts × %d tokens", ccfg.name, summary["n_docs"],
             summary["n_contexts"], ccfg.context_size)
    return summary


def corpus_config_hash(cfg: CorpusConfig, model_cfg: Mapping[str, Any]) -> str:
    """corpus.json's ``config_hash``: the corpus group as composed (`CorpusConfig.as_given`, so a
    config keeps the hash it had when the stage took the raw mapping) and the model settings that
    change the tokens (name, prepend_bos, bos_token)."""
    return canonical_hash({"corpus": cfg.as_given(),
                           "model": {k: model_cfg.get(k) for k in ("name", "prepend_bos", "bos_token")}})


def _source_detail(cfg: CorpusConfig) -> dict:
    if cfg.source == "stdlib_docs":
        return {"python": sys.version.split()[0], "modules": len(sources.STDLIB_MODULES)}
    if cfg.source == "python_docstrings":
        return {"packages": {name: sources.package_version(name) for name in cfg.packages}}
    if cfg.source in ("text_files", "jsonl"):
        return {"paths": list(cfg.paths), **({"text_field": cfg.text_field} if cfg.source == "jsonl" else {})}
    return {"hf_name": cfg.hf_name, "hf_config": cfg.hf_config, "hf_split": cfg.hf_split, "text_field": cfg.text_field}
