"""Errors a user can act on: each names the offending field or file and the fix."""

from __future__ import annotations


class MechflowError(Exception):
    """Base class: the message alone must tell the user what to change."""


class ConfigError(MechflowError, ValueError):
    """A config field has an invalid value (names the field and how to fix it)."""


class DataError(MechflowError, ValueError):
    """An input data file is malformed (names the file, the line/field and the fix)."""


class ModelLoadError(MechflowError, RuntimeError):
    """A model cannot be loaded here (e.g. a hub name while offline)."""


class IntegrityError(DataError):
    """A file on disk does not match its recorded checksum (names the file)."""


def check_known_keys(where: str, cfg, cls) -> None:
    """Raise the unknown-key `ConfigError` of a typed config: ``cls`` is the dataclass whose fields
    are the valid keys of the config section ``where`` (e.g. ``"corpus"``)."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        group = where.split(".")[0]
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys are {sorted(known)} "
                          f"(check config/{group}/*.yaml or the override for a typo)")


def one_line(exc: BaseException, limit: int = 3) -> str:
    """`exc` as one line for a message: a pydantic ValidationError as ``field: problem; ...`` (its
    first `limit` errors), anything else with its lines joined by "; " (a message is one line)."""
    errors = getattr(exc, "errors", None)
    items = errors() if callable(errors) and type(exc).__name__ == "ValidationError" else None
    if items:
        parts = [f"{'.'.join(map(str, e['loc'])) or '<document>'}: {e['msg']}" for e in items[:limit]]
        return "; ".join(parts) + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
