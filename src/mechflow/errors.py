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
