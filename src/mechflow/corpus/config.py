"""Typed config of the corpus stage (Hydra group ``corpus``, `config/corpus/*.yaml`).

`workflow/schemas/config/corpus.schema.json` is generated from `CorpusConfig`. A config built from a
mapping remembers which keys the mapping gave (`CorpusConfig.as_given`): corpus.json's
``config_hash`` has always hashed the group as composed, without the class defaults of the keys
it left out, and keeps doing so, so the same config keeps its hash.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, ModelWrapValidatorHandler, StrictInt, StrictStr, model_validator

from mechflow.config import FieldError, GroupConfig, config_model

Source = Literal["stdlib_docs", "python_docstrings", "text_files", "jsonl", "hf_dataset"]
SOURCES: tuple[str, ...] = get_args(Source)


@config_model("corpus")
class CorpusConfig(GroupConfig):
    """Where the text comes from and how it is cut into token contexts."""

    name: StrictStr = Field("stdlib_docs", min_length=1, description="Corpus name, used in output paths and "
                            "corpus.json.")
    source: Source = Field("stdlib_docs", description="stdlib_docs: Python standard library docstrings (offline "
                           "default); python_docstrings: docstrings of the .py files of `packages`, read with ast, in "
                           "a seeded random order (offline, millions of tokens); text_files: *.txt/*.md files or "
                           "folders; jsonl: JSON lines with text_field; hf_dataset: Hugging Face dataset by name "
                           "(online only).")
    context_size: StrictInt = Field(128, ge=2, description="Tokens per context, BOS included when model.prepend_bos "
                                    "(then BOS + context_size-1 text tokens).")
    max_tokens: StrictInt = Field(100_000, ge=2, description="Cap on total tokens: at most max_tokens // "
                                  "context_size contexts are written (so at least context_size).")
    paths: tuple[StrictStr, ...] = Field((), description="Files or folders to read (text_files, jsonl).")
    packages: tuple[StrictStr, ...] = Field(
        (), description="python_docstrings: installed package names whose .py docstrings are read (no import); "
        "'stdlib' = the standard library.")
    text_field: StrictStr = Field("text", description="JSON field holding the document text (jsonl, hf_dataset).")
    hf_name: StrictStr | None = Field(None, description="Hugging Face dataset name (hf_dataset).")
    hf_config: StrictStr | None = Field(None, description="Hugging Face dataset configuration name, or null.")
    hf_split: StrictStr = Field("train", description="Hugging Face dataset split (hf_dataset).")
    separator: Literal["bos", "eos"] = Field(
        "bos", description="Token between concatenated documents: bos = the model's BOS (model.bos_token; every "
        "document starts like a prompt), eos = the tokenizer's EOS. Falls back to EOS when model.prepend_bos is "
        "false.")

    @model_validator(mode="wrap")
    @classmethod
    def _remember_given_keys(cls, data: Any, handler: ModelWrapValidatorHandler[CorpusConfig]) -> CorpusConfig:
        cfg = handler(data)
        # not a field (the schema and asdict stay as they are); None: built from arguments, every field given
        object.__setattr__(cfg, "_given_keys", tuple(data) if isinstance(data, dict) else None)
        return cfg

    def as_given(self) -> dict[str, Any]:
        """The settings as plain data, only the keys the composed mapping gave (every field when the
        config was built from arguments): the group exactly as composed, e.g. for a hash that must
        not change when a class default is added or changed."""
        values = self.to_dict()
        given = getattr(self, "_given_keys", None)
        return values if given is None else {k: values[k] for k in given}

    @model_validator(mode="after")
    def _source_has_what_it_reads(self) -> CorpusConfig:
        if self.max_tokens < self.context_size:
            raise FieldError("max_tokens", f"({self.max_tokens}) must be >= corpus.context_size "
                             f"({self.context_size}) so that at least one context is written")
        if self.source in ("text_files", "jsonl") and not self.paths:
            raise FieldError("paths", f"is empty; corpus.source={self.source} needs files or folders to read")
        if self.source == "python_docstrings" and not self.packages:
            raise FieldError("packages", "is empty; corpus.source=python_docstrings needs package names, "
                             "e.g. [stdlib, numpy]")
        if self.source == "hf_dataset" and not self.hf_name:
            raise FieldError("hf_name", "is empty; corpus.source=hf_dataset needs a dataset name")
        return self
