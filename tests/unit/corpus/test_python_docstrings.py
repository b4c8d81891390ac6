"""The `python_docstrings` corpus source: ast-read docstrings, nothing imported, seeded order."""

from __future__ import annotations

import sys

import pytest

from mechflow.corpus.config import CorpusConfig
from mechflow.corpus.core import _source_detail, iter_documents
from mechflow.corpus.sources import package_root, python_docstrings
from mechflow.errors import ConfigError


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "mfdocpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "tests").mkdir()
    (pkg / "__init__.py").write_text('"""Package doc."""\nraise RuntimeError("imported!")\n')
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text(
        '"""Module doc."""\n\nclass A:\n    """Class doc."""\n\n    def f(self):\n        """Method doc."""\n\n'
        'async def g():\n    """Package doc."""\n\ndef h():\n    return 1\n')
    (pkg / "tests" / "test_x.py").write_text('"""Test doc."""\n')
    (pkg / "broken.py").write_text('"""Never read."""\ndef (:\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg


def test_reads_every_docstring_without_importing(fake_package):
    docs = list(python_docstrings(["mfdocpkg"]))
    assert sorted(docs) == ["Class doc.", "Method doc.", "Module doc.", "Package doc."]  # deduplicated
    assert "mfdocpkg" not in sys.modules  # read with ast: the RuntimeError never ran
    assert list(python_docstrings(["mfdocpkg"])) == docs  # the seeded order is stable
    assert {tuple(python_docstrings(["mfdocpkg"], seed=s)) for s in range(10)} != {tuple(docs)}


def test_unknown_package_and_missing_packages_are_config_errors():
    with pytest.raises(ConfigError, match="corpus.packages: 'no_such_pkg_xyz'"):
        list(python_docstrings(["no_such_pkg_xyz"]))
    with pytest.raises(ConfigError, match="corpus.packages is empty"):
        CorpusConfig.from_dict({"source": "python_docstrings"})


def test_stdlib_corpus_config_and_recorded_versions():
    cfg = CorpusConfig.from_dict({"name": "d", "source": "python_docstrings", "packages": ["stdlib"]})
    assert package_root("stdlib").joinpath("os.py").exists()
    first = next(iter(iter_documents(cfg)))
    assert isinstance(first, str) and first.strip()
    assert _source_detail(cfg) == {"packages": {"stdlib": sys.version.split()[0]}}
