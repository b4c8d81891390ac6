"""Document sources: each yields real text documents (str) in a stable order.

* ``stdlib_docs`` (the offline default): docstrings of a fixed, sorted list of Python standard
  library modules, their public classes, functions and public methods, read with
  ``inspect.getdoc`` and de-duplicated (first occurrence kept). The text depends only on the
  CPython version (recorded in ``corpus.json``); every module listed imports without side effects
  on CPython 3.11 and 3.12.
* ``python_docstrings``: every docstring (module, class, function) of the ``.py`` files of the
  standard library and/or installed packages, read with ``ast`` (nothing is imported, so nothing
  runs); files in sorted path order, de-duplicated. About 0.36M tokens from the standard library,
  millions from scientific packages: the offline corpus for dictionaries that need more data. The
  text depends on the package versions (recorded in ``corpus.json``; pinned by constraints.txt).
* ``text_files``: plain text files, or folders searched recursively for ``*.txt`` / ``*.md``;
  one document per file, files in sorted path order.
* ``jsonl``: JSON-lines files; one document per line, the string at ``text_field``.
* ``hf_dataset``: a Hugging Face dataset by name, streamed (needs network).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from mechflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Sorted; chosen to exist on CPython 3.11 and 3.12, import silently (no deprecation warnings, no
# GUI, no printing: `this`, `antigravity`, `tkinter`, `turtle`, `idlelib` are left out on purpose).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "binascii", "bisect", "builtins",
    "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections",
    "collections.abc", "colorsys", "compileall", "concurrent.futures", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "email.message", "email.parser", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http", "http.client", "http.cookies", "http.server", "imaplib",
    "importlib", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache",
    "locale", "logging", "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes",
    "modulefinder", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath",
    "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri",
    "random", "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "stat", "statistics", "string", "stringprep", "struct", "subprocess", "symtable",
    "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing",
    "unicodedata", "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


def _public_members(obj: object) -> list[tuple[str, object]]:
    try:
        members = sorted(vars(obj).items())
    except TypeError:
        return []
    return [(n, m) for n, m in members if not n.startswith("_")]


def _defined_in(member: object, module_name: str) -> bool:
    # Re-exported names (e.g. `os.path` functions seen from `shutil`) belong to their own module.
    return getattr(member, "__module__", None) == module_name


def stdlib_docs(modules: tuple[str, ...] = STDLIB_MODULES) -> Iterator[str]:
    """Yield de-duplicated docstrings of `modules` (module, then public classes/functions/methods).

    Order: modules as listed, members sorted by name, each class followed by its public methods.
    """
    seen: set[str] = set()

    def emit(obj: object) -> Iterator[str]:
        doc = inspect.getdoc(obj)
        if doc and doc.strip() and doc not in seen:
            seen.add(doc)
            yield doc.strip()

    for name in modules:
        # Deprecated aliases (e.g. typing.io) warn when touched; reading a docstring is harmless.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except ImportError:  # e.g. a Python built without ssl/sqlite3: skip, logged
                log.warning("stdlib module %s is not importable here; skipped", name)
                continue
            docs = list(emit(module))
            for _, member in _public_members(module):
                if not (inspect.isclass(member) or inspect.isroutine(member)) or not _defined_in(member, name):
                    continue
                docs.extend(emit(member))
                if inspect.isclass(member):
                    for _, method in _public_members(member):
                        if inspect.isroutine(method) or isinstance(method, property):
                            docs.extend(emit(method))
        yield from docs


# Standard-library folders that are tests, GUIs or bundled wheels rather than library prose.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3",
                "ensurepip", "__pycache__"}
STDLIB = "stdlib"


def package_root(name: str) -> Path:
    """Folder of an installed package (found without importing it), or the standard library's."""
    if name == STDLIB:
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(name) if "." not in name else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"corpus.packages: {name!r} is not an installed package here; install it or remove "
                          f"it (use '{STDLIB}' for the standard library)")
    return Path(list(spec.submodule_search_locations)[0])


def package_version(name: str) -> str:
    if name == STDLIB:
        import sys

        return sys.version.split()[0]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def python_docstrings(packages: list[str], seed: int = 0) -> Iterator[str]:
    """Docstrings of every module, class and function in the packages' ``.py`` files (``ast``, no
    import; tests folders skipped), de-duplicated, then put in one seeded random order: any prefix
    (``max_tokens``) and any shard is then a sample of every package, so held-out shards are not a
    different distribution from the training ones."""
    import random

    docs = list(_python_docstrings_in_order(packages))
    random.Random(seed).shuffle(docs)
    yield from docs


def _python_docstrings_in_order(packages: list[str]) -> Iterator[str]:
    """Package by package, files sorted, nodes in ``ast.walk`` order."""
    seen: set[str] = set()
    for name in packages:
        root = package_root(name)
        for f in sorted(root.rglob("*.py")):
            parts = f.relative_to(root).parts[:-1]
            if any(p in _STDLIB_SKIP or p.startswith("test") for p in parts):
                continue
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # e.g. a file written for another Python version: no docstrings from it
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and doc.strip() and doc not in seen:
                        seen.add(doc)
                        yield doc.strip()


def text_files(paths: list[str | os.PathLike]) -> Iterator[str]:
    """One document per file; folders are searched recursively for *.txt and *.md (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in {".txt", ".md"}))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"corpus.paths: {p} does not exist; give existing text files or folders")
    if not files:
        raise ConfigError(f"corpus.paths: no *.txt/*.md files found under {[str(p) for p in paths]}")
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{f}: not UTF-8 text ({exc}); convert it to UTF-8 or remove it from corpus.paths") from exc
        if text.strip():
            yield text


def jsonl(paths: list[str | os.PathLike], text_field: str) -> Iterator[str]:
    """One document per JSON line: the string at `text_field` (blank lines skipped)."""
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"corpus.paths: {p} does not exist; give existing .jsonl files")
        with open(p, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from exc
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f"{p}:{lineno}: field {text_field!r} is missing or not a string; "
                        f"set corpus.text_field to the field holding the text"
                    )
                if text.strip():
                    yield text


def hub_offline() -> bool:
    """True when the environment forbids reaching the Hugging Face hub."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MECHFLOW_OFFLINE")
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in flags)


def hf_dataset(name: str, split: str, text_field: str, config_name: str | None = None) -> Iterator[str]:
    """Stream documents of a Hugging Face dataset (online only)."""
    hint = ("Use the offline corpus instead: `corpus=stdlib_docs` "
            "(or corpus=text_files / corpus=jsonl with local files).")
    if hub_offline():
        raise ConfigError(f"corpus.hf_name={name!r} needs the Hugging Face hub, but the hub is offline here "
                          f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/MECHFLOW_OFFLINE is set). {hint}")
    try:
        import datasets

        stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
        for record in stream:
            text = record.get(text_field)
            if not isinstance(text, str):
                raise DataError(f"dataset {name!r}: field {text_field!r} is missing or not a string; "
                                "set corpus.text_field")
            if text.strip():
                yield text
    except (ConfigError, DataError):
        raise
    except Exception as exc:  # network errors come in many types; the hint is what the user needs
        raise ConfigError(f"corpus.hf_name={name!r} could not be loaded ({type(exc).__name__}: {exc}). {hint}") from exc
