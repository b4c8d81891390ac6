"""Typed view of the `corpus` config group (config/corpus/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mechflow.errors import ConfigError, check_known_keys

SOURCES = ("stdlib_docs", "python_docstrings", "text_files", "jsonl", "hf_dataset")


@dataclass(frozen=True)
class CorpusConfig:
    """See workflow/schemas/config/corpus.schema.json for each key's meaning."""

    name: str = "stdlib_docs"
    source: str = "stdlib_docs"
    context_size: int = 128
    max_tokens: int = 100_000
    paths: tuple[str, ...] = field(default_factory=tuple)
    packages: tuple[str, ...] = field(default_factory=tuple)
    text_field: str = "text"
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    separator: str = "bos"

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "CorpusConfig":
        check_known_keys("corpus", cfg, cls)
        values = dict(cfg)
        if "paths" in values:
            paths = values["paths"]
            values["paths"] = (paths,) if isinstance(paths, str) else tuple(str(p) for p in (paths or ()))
        if "packages" in values:
            pkgs = values["packages"]
            values["packages"] = (pkgs,) if isinstance(pkgs, str) else tuple(str(p) for p in (pkgs or ()))
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"corpus.source={self.source!r} is not one of {list(SOURCES)}")
        if not isinstance(self.context_size, int) or self.context_size < 2:
            raise ConfigError(f"corpus.context_size={self.context_size!r} must be an integer ≥ 2")
        if not isinstance(self.max_tokens, int) or self.max_tokens < self.context_size:
            raise ConfigError(
                f"corpus.max_tokens={self.max_tokens!r} must be an integer ≥ corpus.context_size "
                f"({self.context_size}) so that at least one context is written"
            )
        if self.separator not in ("bos", "eos"):
            raise ConfigError(f"corpus.separator={self.separator!r} must be 'bos' or 'eos'")
        if self.source in ("text_files", "jsonl") and not self.paths:
            raise ConfigError(f"corpus.paths is empty; corpus.source={self.source} needs files or folders to read")
        if self.source == "python_docstrings" and not self.packages:
            raise ConfigError("corpus.packages is empty; corpus.source=python_docstrings needs package names, "
                              "e.g. [stdlib, numpy]")
        if self.source == "hf_dataset" and not self.hf_name:
            raise ConfigError("corpus.hf_name is empty; corpus.source=hf_dataset needs a dataset name")
