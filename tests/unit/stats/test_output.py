"""Output helpers write complete Parquet/CSV/JSON/PNG files and nothing on failure."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from mechflow.errors import DataError
from mechflow.stats import (
    ModelComponents,
    bootstrap_means,
    bootstrap_rank_stability,
    cka_by_depth,
    fcas_test,
    pairwise_stability,
    summarize_bootstrap,
    summarize_bootstrap_stability,
    summarize_cka,
    summarize_fcas,
    summarize_pairwise_stability,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _no_temp_files(d):
    return not [p for p in d.iterdir() if p.name.startswith(".")]


def test_summarize_bootstrap_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 5))
    X[:, 4] = 1.0  # a constant column must survive (point interval)
    res = bootstrap_means(X, B=200, seed=0)
    names = [f"L{i}H0" for i in range(5)]
    paths = summarize_bootstrap(res, tmp_path, names=names)
    df = pl.read_parquet(paths["parquet"])
    assert df["name"].to_list() == names
    np.testing.assert_allclose(df["estimate"].to_numpy(), res.estimate)
    np.testing.assert_allclose(df.select("bca_low", "bca_high").to_numpy(), res.ci("bca"))
    assert pl.read_csv(paths["csv"]).shape == df.shape
    meta = json.loads(paths["json"].read_text())
    assert meta["B"] == 200 and meta["methods"] == ["bca", "percentile"]
    assert paths["forest"].read_bytes()[:8] == PNG_MAGIC
    assert _no_temp_files(tmp_path)


def test_bad_names_write_nothing(tmp_path):
    res = bootstrap_means(np.random.default_rng(0).normal(size=(10, 3)), B=20)
    with pytest.raises(DataError, match="2 names for 3 statistics"):
        summarize_bootstrap(res, tmp_path / "out", names=["a", "b"])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_stability_fcas_cka_outputs(tmp_path):
    rng = np.random.default_rng(1)
    scores = {m: rng.normal(size=12) for m in ("eap", "eap_ig", "acdc")}
    p = summarize_pairwise_stability(pairwise_stability(scores, k=3), tmp_path)
    assert pl.read_parquet(p["parquet"]).height == 9
    assert p["heatmap"].read_bytes()[:8] == PNG_MAGIC
    bs = bootstrap_rank_stability(rng.normal(size=(20, 12)), k=3, B=50)
    p = summarize_bootstrap_stability(bs, tmp_path)
    assert json.loads(p["json"].read_text())["B"] == 50

    labels = np.array(["mlp", "induction"])
    a = ModelComponents(rng.normal(size=20), rng.integers(0, 4, 20), 4, rng.choice(labels, 20),
                        [f"a{i}" for i in range(20)])
    b = ModelComponents(rng.normal(size=15), rng.integers(0, 6, 15), 6, rng.choice(labels, 15))
    r = fcas_test(a, b, 5, n_permutations=100)
    p = summarize_fcas(r, tmp_path, a=a, b=b)
    d = json.loads(p["json"].read_text())
    assert d["score"] == pytest.approx(r.score) and len(d["pairs"]) == 5 and d["pairs"][0]["a"].startswith("a")
    assert p["histogram"].read_bytes()[:8] == PNG_MAGIC

    acts = [rng.normal(size=(30, 4)) for _ in range(2)]
    p = summarize_cka(cka_by_depth(acts, acts), tmp_path)
    assert pl.read_parquet(p["parquet"])["cka"].len() == 4
    assert _no_temp_files(tmp_path)


def test_summarize_cka_writes_exactly_the_named_paths(tmp_path):
    rng = np.random.default_rng(1)
    acts = [rng.normal(size=(30, 4)) for _ in range(2)]
    res = cka_by_depth(acts, acts)
    default = summarize_cka(res, tmp_path / "default")
    named = {"parquet": tmp_path / "t" / "x.parquet", "csv": tmp_path / "c" / "x.csv",
             "heatmap": tmp_path / "f" / "x.png"}
    assert summarize_cka(res, **named) == named
    for key, path in named.items():
        assert [p.name for p in path.parent.iterdir()] == [path.name], key
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == ["cka.csv", "cka.parquet", "cka.png"]
    for key in ("parquet", "csv"):
        assert named[key].read_bytes() == default[key].read_bytes(), key
    with pytest.raises(TypeError, match="out_dir"):
        summarize_cka(res, parquet=named["parquet"])
