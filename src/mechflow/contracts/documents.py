"""JSON documents: the base models, and how writers and readers go through a contract.

Writers: ``write_document(path, Model, doc)`` checks ``doc`` against the model and writes ``doc``
itself (`mechflow.io.atomic_write_json`), so a file's bytes (key order, ``1`` vs ``1.0``, which
optional keys appear) never depend on pydantic's serialiser and stay what they were before the
contract existed. Documents built as model instances (``circuit.json``, ``_manifest.json``) are
written by dumping the instance.

Readers: ``read_document`` returns the parsed model; ``load_document`` returns the checked dict
for code that reads keys (``partial=True`` checks only the keys present: for readers of files
that test fixtures or older runs write with a subset of the keys). Every failure is a
`DataError` naming the file, what it should be and the fix.

A "model" here is a `Document` subclass or a union of them (``SaeTraining | TranscoderTraining``).
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from mechflow.contracts.versions import SCHEMA_VERSION, SchemaVersion
from mechflow.errors import DataError, one_line
from mechflow.io import atomic_write_json


class Document(BaseModel):
    """Base of every JSON document and of its parts: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


class VersionedDocument(Document):
    """A document whose first key is ``schema_version`` (`mechflow.contracts.versions`)."""

    schema_version: SchemaVersion = Field(SCHEMA_VERSION, description="contract version (mechflow.contracts.versions)")


def union_members(model: Any) -> tuple[type[BaseModel], ...]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return (model,)
    if typing.get_origin(model) is Annotated:
        return union_members(typing.get_args(model)[0])
    if typing.get_origin(model) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(model) for m in union_members(a))
    raise TypeError(f"{model!r} is not a document model or a union of them")


def model_name(model: Any) -> str:
    return " | ".join(m.__name__ for m in union_members(model))


@lru_cache(maxsize=None)
def adapter(model: Any) -> TypeAdapter:
    """The (cached) TypeAdapter of a document model or union of document models."""
    return TypeAdapter(model)


@lru_cache(maxsize=None)
def _field_adapters(model: type[BaseModel]) -> dict[str, TypeAdapter]:
    return {(f.alias or name): TypeAdapter(Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation)
            for name, f in model.model_fields.items()}


def _check_present(model: Any, doc: Any) -> None:
    """Every key of ``doc`` is a field of (one member of) ``model`` with a value of its type."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    first: ValueError | None = None
    for member in union_members(model):
        fields = _field_adapters(member)
        try:
            unknown = [k for k in doc if k not in fields]
            if unknown:
                raise ValueError(f"unknown key(s) {unknown} (a {member.__name__} has {list(fields)})")
            for key, value in doc.items():
                fields[key].validate_python(value)
            return
        except ValueError as exc:
            first = first or exc
    assert first is not None
    raise first


def check_document(model: Any, doc: Any, *, partial: bool = False) -> Any:
    """``doc`` unchanged after checking it against ``model`` (pydantic's ValidationError if not)."""
    if partial:
        _check_present(model, doc)
    else:
        adapter(model).validate_python(doc)
    return doc


def write_document(path: str | os.PathLike, model: Any, doc: Any) -> Path:
    """Check ``doc`` against ``model``, then write it atomically exactly as given (2-space JSON)."""
    return atomic_write_json(path, check_document(model, doc))


def _parse(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; {fix}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({one_line(exc)}); {fix}") from exc


def read_document(path: str | os.PathLike, model: Any, *, fix: str) -> Any:
    """The document at ``path`` parsed as ``model`` (an instance of it, or of a union member)."""
    path = Path(path)
    data = _parse(path, fix)
    try:
        return adapter(model).validate_python(data)
    except ValueError as exc:
        raise DataError(f"{path}: not a valid {model_name(model)} ({one_line(exc)}); {fix}") from exc


def load_document(path: str | os.PathLike, model: Any, *, fix: str, partial: bool = False) -> dict:
    """The document at ``path`` as a dict, checked against ``model`` (only its keys when ``partial``)."""
    path = Path(path)
    data = _parse(path, fix)
    try:
        return check_document(model, data, partial=partial)
    except ValueError as exc:
        raise DataError(f"{path}: not a valid {model_name(model)} ({one_line(exc)}); {fix}") from exc
