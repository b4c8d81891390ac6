"""Bad input: one clear error and no partial output, case by case (issue 20 §4).

The contract every stage keeps (docs/configuration.md, "Bad input"): input that cannot work raises
ONE `mechflow.errors` error (`ConfigError` for a setting, `DataError` / `IntegrityError` for a file,
`ModelLoadError` for a model that cannot be had here) whose message is one line, names the field
(`harvest.layers`) or the file (`tokens.parquet`, `ex.jsonl:3`) and says how to fix it; and it
fails before writing, so the outputs it was given do not exist afterwards and nothing else in
their folder is new or changed (outputs are written atomically, last).

Each entry of `CASES` is one bad input: its id (`<area>-<what>`), the error type, a substring
that names the field or file, a substring of the fix, and `arrange`, which writes the (otherwise
good) inputs under `tmp_path` and returns the call that must fail. Areas: `config` (composition,
as the Snakefile does it: `load_runs` then `check_harvested_hooks` / `check_dictionary_widths`),
`models`, `tasks`, `shards` (corpus tokens, harvest and its shards) and `training` (SAE). Models
are the tiny random llama (`tiny_llama`) and SmolLM2's tokenizer; one case loads SmolLM2 itself.

More bad-input tests live beside their stages and stay there: tests/unit/config/test_compose.py,
tests/unit/tasks/test_jsonl.py, tests/unit/harvest/test_harvest_stage.py and test_harvest_shards.py,
tests/unit/dictionaries/test_sae.py, tests/unit/corpus/test_corpus_stage.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml

from mechflow.errors import ConfigError, DataError, IntegrityError, MechflowError, ModelLoadError

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests/unit/harvest"), str(REPO / "tests/unit/dictionaries")]

from dictionary_shards import write_shards  # noqa: E402  (test helpers, not packages)
from harvest_testlib import write_tokens  # noqa: E402

SMOL = yaml.safe_load((REPO / "config/model/smollm2_135m.yaml").read_text())
TINY = {"name": "tiny_llama", "prepend_bos": True}


class Inputs:
    """What a case's `arrange` may use: the tiny model (a session fixture, loaded on first use)."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    @property
    def tiny_llama(self) -> Any:
        return self._request.getfixturevalue("tiny_llama")


@dataclass(frozen=True)
class Case:
    id: str
    error: type[MechflowError]
    names: str  # the field or file the message names
    fix: str  # a word of the fix it gives
    arrange: Callable[[Path, Inputs], Callable[[], Any]]  # writes the inputs; returns the call that fails

    @property
    def area(self) -> str:
        return self.id.split("-", 1)[0]


CASES: list[Case] = []


def case(id: str, error: type[MechflowError], names: str, fix: str):
    """Register the decorated `arrange` function as one case of the table."""

    def register(arrange):
        CASES.append(Case(id, error, names, fix, arrange))
        return arrange

    return register


# ------------------------------------------------------------------------------------------ config

def compose_as_the_snakefile_does(overrides: list[str]) -> None:
    """`load_runs` and the whole-run checks of workflow/rules/common.smk (RUNS restored after)."""
    from mechflow.workflow import RUNS, check_dictionary_widths, check_harvested_hooks, load_runs

    saved = dict(RUNS)
    try:
        for run in load_runs({"overrides": overrides}).values():
            check_harvested_hooks(run)
            check_dictionary_widths(run)
    finally:
        RUNS.clear()
        RUNS.update(saved)


CONFIG_CASES = [  # id, overrides, names, fix
    ("unknown-key", ["+harvest.shard_rowz=10"], "shard_rowz", "Fix the spelling"),
    ("unknown-root-key", ["+sede=1"], "sede", "Fix the spelling"),
    ("wrong-type", ["harvest.batch_size=abc"], "harvest.batch_size", "override"),
    ("out-of-range", ["threads=0"], "threads", "override"),
    ("unknown-option", ["model=does_not_exist"], "'model'", "use one of them"),
    ("unknown-task", ["task=[nope]"], "'task'", "add config/task/nope.yaml"),
    ("override-syntax", ["harvest.layers=[3,"], "harvest.layers", "fix the override"),
    ("model-dtype", ["model.dtype=int8"], "model.dtype", "override"),
    ("sae-d_in-resid", ["sae.d_in=512"], "sae.d_in", "set sae.d_in=576"),
    ("sae-d_in-other-model", ["model=gemma3_270m", "sae.d_in=576"], "sae.d_in", "set sae.d_in="),
    ("sae-hook-not-harvested", ["sae.hook=blocks.3.hook_resid_post"], "sae.hook", "harvest.hooks="),
    ("context-over-n_ctx", ["corpus.context_size=4096"], "corpus.context_size", "lower it"),
    ("layer-over-n_layers", ["harvest.layers=[40]"], "harvest.layers", "pick layers below 30"),
    ("corpus-max_tokens", ["corpus.max_tokens=10"], "corpus.max_tokens", "fix it"),
    ("audit-no-base_url", ["audit.enabled=true"], "audit.base_url", "audit.base_url=http"),
    ("audit-base_url-scheme", ["audit.base_url=ftp://host/v1"], "audit.base_url", "e.g. http"),
    ("task-n_prompts", ["task.ioi.n_prompts=0"], "task.ioi.n_prompts", "override"),
    ("jsonl-task-no-path", ["task=[jsonl_example]", "task.jsonl_example.path=null"], "task.jsonl_example.path",
     "override"),
    ("run_name-chars", ["run_name=a/b"], "run_name", "override"),
    ("sweep-collision", ["run_name=same", "seed=0,1"], "run_name", "remove `run_name`"),
]
for _id, _overrides, _names, _fix in CONFIG_CASES:
    CASES.append(Case(f"config-{_id}", ConfigError, _names, _fix,
                      lambda tmp, inp, ov=_overrides: lambda: compose_as_the_snakefile_does(ov)))


# ------------------------------------------------------------------------------------------ models

@case("models-unknown-dtype", ConfigError, "model.dtype", "Fix it")
def _(tmp, inp):
    from mechflow.models import load_model_from_cfg

    return lambda: load_model_from_cfg({**SMOL, "dtype": "int8"})


@case("models-empty-name", ConfigError, "model.name", "Fix it")
def _(tmp, inp):
    from mechflow.models import load_model_from_cfg

    return lambda: load_model_from_cfg({"name": ""})


@case("models-hub-name-offline", ModelLoadError, "'gpt2'", "model=smollm2_135m")
def _(tmp, inp):
    from mechflow.models import load_model_from_cfg

    return lambda: load_model_from_cfg({"name": "gpt2"})


@case("models-bos-not-in-vocabulary", ModelLoadError, "model.bos_token", "set it to")
def _(tmp, inp):
    from mechflow.corpus import prepare_corpus

    return lambda: prepare_corpus({"name": "stdlib_docs", "source": "stdlib_docs"},
                                  model_cfg={**SMOL, "bos_token": "<nope>"}, tokens=tmp / "out" / "tokens.parquet",
                                  corpus_manifest=tmp / "out" / "corpus.json")


@case("models-stated-n_layers", ConfigError, "model.n_layers", "set model.n_layers=30")
def _(tmp, inp):
    from mechflow.models import load_model_from_cfg

    return lambda: load_model_from_cfg({**SMOL, "n_layers": 12})  # loads SmolLM2 (seconds, from the cache)


# ------------------------------------------------------------------------------------------- tasks

PARIS = {"prompt": "The capital of France is", "corrupted_prompt": "The capital of Italy is",
         "answer": " Paris", "wrong_answer": " Rome"}


def jsonl_task(tmp: Path, lines: list[Any] | bytes) -> Callable[[], Any]:
    """prepare_task of a jsonl task whose file holds `lines` (objects, or raw text lines)."""
    from mechflow.tasks import prepare_task

    path = tmp / "ex.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    cfg = {"name": "mine", "kind": "jsonl", "path": str(path), "n_prompts": 10}
    return lambda: prepare_task(cfg, model_cfg=SMOL, dataset=tmp / "out" / "dataset.jsonl")


@case("tasks-prompt-over-n_ctx", DataError, "model.n_ctx = 2048", "shorten the prompts")
def _(tmp, inp):
    filler = "the " * 2100
    return jsonl_task(tmp, [{**PARIS, "prompt": filler + PARIS["prompt"],
                             "corrupted_prompt": filler + PARIS["corrupted_prompt"]}])


@case("tasks-malformed-line", DataError, "ex.jsonl:2", "each line must be one JSON object")
def _(tmp, inp):
    return jsonl_task(tmp, [PARIS, '{"prompt": "oops"'])


@case("tasks-missing-field", DataError, "ex.jsonl:1", "task_example.schema.json")
def _(tmp, inp):
    return jsonl_task(tmp, [{k: v for k, v in PARIS.items() if k != "wrong_answer"}])


@case("tasks-not-an-object", DataError, "ex.jsonl:1", "expected a JSON object")
def _(tmp, inp):
    return jsonl_task(tmp, ["[1, 2]"])


@case("tasks-multi-token-answer", DataError, "line 1: answer ' Buenos Aires'", "exactly one token")
def _(tmp, inp):
    return jsonl_task(tmp, [{**PARIS, "answer": " Buenos Aires"}])


@case("tasks-unequal-lengths", DataError, "line 1: prompt has", "Make corrupted_prompt tokenize")
def _(tmp, inp):
    return jsonl_task(tmp, [{**PARIS, "corrupted_prompt": "The capital city of the Italian Republic is"}])


@case("tasks-same-answers", DataError, "line 1", "wrong_answer must be a different token")
def _(tmp, inp):
    return jsonl_task(tmp, [{**PARIS, "wrong_answer": " Paris"}])


@case("tasks-duplicate-ids", DataError, "id 'a'", "ids must be unique")
def _(tmp, inp):
    return jsonl_task(tmp, [{**PARIS, "id": "a"}, {**PARIS, "id": "a"}])


@case("tasks-empty-file", DataError, "ex.jsonl", "add one JSON object per line")
def _(tmp, inp):
    return jsonl_task(tmp, [])


@case("tasks-not-utf8", DataError, "ex.jsonl", "save the file as UTF-8")
def _(tmp, inp):
    return jsonl_task(tmp, b'{"prompt": "caf\xe9"}\n')


@case("tasks-file-missing", DataError, "nowhere.jsonl", "check the task's `path`")
def _(tmp, inp):
    from mechflow.tasks import prepare_task

    cfg = {"name": "mine", "kind": "jsonl", "path": str(tmp / "nowhere.jsonl"), "n_prompts": 10}
    return lambda: prepare_task(cfg, model_cfg=SMOL, dataset=tmp / "out" / "dataset.jsonl")


@case("tasks-dataset-tampered", IntegrityError, "dataset.jsonl", "re-run the prepare_task stage")
def _(tmp, inp):
    from mechflow.tasks import evaluate_task
    from mechflow.testing import write_tiny_task_dataset

    dataset = write_tiny_task_dataset(tmp / "task" / "dataset.jsonl", "tiny_llama")
    dataset.write_text(dataset.read_text().replace('"e0"', '"e9"'))
    cfg = {"name": "t", "kind": "jsonl", "path": "x.jsonl", "n_prompts": 5}
    return lambda: evaluate_task(cfg, model_cfg=TINY, dataset=dataset, baseline=tmp / "out" / "baseline.json",
                                 model=inp.tiny_llama)


# ------------------------------------------------------------------------------------------ shards

def harvest_call(tmp: Path, inp: Inputs, tokens: Path, **cfg: Any) -> Callable[[], Any]:
    from mechflow.harvest import harvest

    base = {"layers": [1], "hook_points": ["resid_post"], "batch_size": 3, "shard_rows": 36, "progress": False}
    return lambda: harvest({**base, **cfg}, model_cfg=TINY, tokens=tokens, index=tmp / "out" / "index.json",
                           harvest_dir=tmp / "out" / "shards", loaded_model=inp.tiny_llama)


@case("shards-tokens-not-parquet", DataError, "tokens.parquet", "rerun the corpus stage")
def _(tmp, inp):
    tokens = tmp / "corpus" / "tokens.parquet"
    tokens.parent.mkdir()
    tokens.write_bytes(b"not parquet")
    return harvest_call(tmp, inp, tokens)


@case("shards-corpus-context-over-n_ctx", ConfigError, "corpus.context_size", "lower it")
def _(tmp, inp):
    from mechflow.corpus import prepare_corpus

    return lambda: prepare_corpus({"name": "stdlib_docs", "source": "stdlib_docs", "context_size": 4096},
                                  model_cfg=SMOL, tokens=tmp / "out" / "tokens.parquet",
                                  corpus_manifest=tmp / "out" / "corpus.json")


@case("shards-token-out-of-vocabulary", DataError, "tokens.parquet", "rerun the corpus stage")
def _(tmp, inp):
    tokens = tmp / "corpus" / "tokens.parquet"
    write_tokens(tokens, d_vocab=80, seed=1)  # the tiny model has 50 tokens
    return harvest_call(tmp, inp, tokens)


@case("shards-contexts-over-n_ctx", DataError, "tokens.parquet", "lower corpus.context_size")
def _(tmp, inp):
    tokens = tmp / "corpus" / "tokens.parquet"
    write_tokens(tokens, n_contexts=2, context_size=80)  # the tiny model's n_ctx is 64
    return harvest_call(tmp, inp, tokens)


@case("shards-hook-not-a-model-hook", ConfigError, "blocks.0.hook_resid_psot", "hook_normalized")
def _(tmp, inp):
    tokens = tmp / "corpus" / "tokens.parquet"
    write_tokens(tokens)
    return harvest_call(tmp, inp, tokens, hooks=["blocks.0.hook_resid_psot"])


@case("shards-layer-out-of-range", ConfigError, "harvest.layers", "use 0..1")
def _(tmp, inp):
    tokens = tmp / "corpus" / "tokens.parquet"
    write_tokens(tokens)
    return harvest_call(tmp, inp, tokens, layers=[2])  # the tiny model has layers 0 and 1


@case("shards-corrupted-shard-on-resume", IntegrityError, "part-00001.parquet", "delete part-00001.parquet")
def _(tmp, inp):
    tokens = tmp / "corpus" / "tokens.parquet"
    write_tokens(tokens)
    harvest_call(tmp, inp, tokens)()
    flip_a_byte(tmp / "out" / "shards" / "blocks.1.hook_resid_post" / "part-00001.parquet")
    return harvest_call(tmp, inp, tokens)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def activations(n_ctx: int = 12, T: int = 16, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_ctx, T, d)).astype(np.float32)


def sae_cfg(**kw: Any) -> dict:
    cfg = {"hook": None, "architecture": "topk", "d_sae": 16, "k": 2, "training_tokens": 2000, "lr": 1e-2,
           "n_checkpoints": 0, "data": {"batch_size": 64, "buffer_rows": 128, "chunk_rows": 32, "holdout_shards": 1,
                                        "prefetch": 0},
           "eval": {"max_tokens": 500, "dead_min_tokens": 100, "ce_contexts": 0}}
    for key, value in kw.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return cfg


def train_call(tmp: Path, manifest: Path, **cfg: Any) -> Callable[[], Any]:
    from mechflow.dictionaries import train_sae

    return lambda: train_sae(sae_cfg(**cfg), manifest=manifest, out_dir=tmp / "out" / "sae")


@case("shards-shard-sha-mismatch", IntegrityError, "part-00000.parquet", "re-run the harvest stage")
def _(tmp, inp):
    manifest = write_shards(tmp / "harvest", activations(), contexts_per_shard=4)
    flip_a_byte(tmp / "harvest" / "part-00000.parquet")
    return train_call(tmp, manifest)


@case("shards-manifest-missing", DataError, "_manifest.json", "re-run the harvest stage")
def _(tmp, inp):
    return train_call(tmp, tmp / "harvest" / "_manifest.json")


@case("shards-manifest-not-json", DataError, "_manifest.json", "rerun the harvest stage")
def _(tmp, inp):
    from mechflow.harvest import verify_shards

    manifest = write_shards(tmp / "harvest", activations(), contexts_per_shard=4)
    manifest.write_text("{ not json")
    return lambda: verify_shards(manifest)


@case("shards-manifest-not-json-for-training", DataError, "_manifest.json", "re-run the harvest stage")
def _(tmp, inp):
    manifest = write_shards(tmp / "harvest", activations(), contexts_per_shard=4)
    manifest.write_text("{ not json")
    return train_call(tmp, manifest)


@case("shards-width-not-the-manifests", DataError, "says d=16", "re-run the harvest stage")
def _(tmp, inp):
    manifest = write_shards(tmp / "harvest", activations(d=8), contexts_per_shard=4)
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "d": 16}))
    return train_call(tmp, manifest, d_in=16)


@case("shards-index-not-an-index", DataError, "index.json", "rerun the harvest stage")
def _(tmp, inp):
    from mechflow.harvest import verify_shards

    (tmp / "index.json").write_text(json.dumps({"hooks": "all of them"}))
    return lambda: verify_shards(tmp / "index.json")


@case("shards-index-names-another-hook", ConfigError, "hook='blocks.0.hook_resid_post'", "pass one of them")
def _(tmp, inp):
    from mechflow.harvest import verify_shards

    tokens = tmp / "corpus" / "tokens.parquet"
    write_tokens(tokens)
    harvest_call(tmp, inp, tokens)()
    return lambda: verify_shards(tmp / "out" / "index.json", hook="blocks.0.hook_resid_post")


# ---------------------------------------------------------------------------------------- training

def training_manifest(tmp: Path) -> Path:
    return write_shards(tmp / "harvest", activations(), contexts_per_shard=4)


@case("training-d_in-not-the-harvest-width", ConfigError, "sae.d_in", "set sae.d_in")
def _(tmp, inp):
    return train_call(tmp, training_manifest(tmp), d_in=32)


@case("training-hook-not-the-harvested-one", ConfigError, "sae.hook", "set sae.hook")
def _(tmp, inp):
    return train_call(tmp, training_manifest(tmp), hook="blocks.3.hook_resid_post")


@case("training-other-model", ConfigError, "model.name", "train on that model's harvest")
def _(tmp, inp):
    from mechflow.dictionaries import train_sae

    manifest = training_manifest(tmp)
    return lambda: train_sae(sae_cfg(), manifest=manifest, out_dir=tmp / "out" / "sae", model_cfg=SMOL)


@case("training-d_sae-zero", ConfigError, "sae.d_sae", "see workflow/schemas/config/sae.schema.json")
def _(tmp, inp):
    return train_call(tmp, training_manifest(tmp), d_sae=0)


@case("training-holdout-leaves-nothing", ConfigError, "sae.data.holdout_shards", "lower sae.data.holdout_shards")
def _(tmp, inp):
    return train_call(tmp, training_manifest(tmp), data={"holdout_shards": 3})


@case("training-tokens-under-one-batch", ConfigError, "sae.training_tokens", "raise training_tokens")
def _(tmp, inp):
    return train_call(tmp, training_manifest(tmp), training_tokens=10)


@case("training-drop-and-clip-outliers", ConfigError, "sae.data.drop_outliers", "set one of them to null")
def _(tmp, inp):
    return train_call(tmp, training_manifest(tmp), data={"drop_outliers": 10.0, "clip_outliers": 10.0})


@case("training-unknown-architecture", ConfigError, "sae.architecture", "see workflow/schemas/config/sae.schema.json")
def _(tmp, inp):
    return train_call(tmp, training_manifest(tmp), architecture="sparse_magic")


# ------------------------------------------------------------------------------------------- tests

def snapshot(root: Path) -> dict[str, str]:
    """Every file (its sha256) and folder under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_no_partial_output(bad: Case, tmp_path, request):
    call = bad.arrange(tmp_path, Inputs(request))
    before = snapshot(tmp_path)
    with pytest.raises(MechflowError) as raised:
        call()
    message = str(raised.value)
    assert isinstance(raised.value, bad.error), f"{type(raised.value).__name__}, not {bad.error.__name__}: {message}"
    assert "\n" not in message, f"a multi-line message: {message!r}"
    assert bad.names in message, f"does not name {bad.names!r}: {message}"
    assert bad.fix.lower() in message.lower(), f"no fix ({bad.fix!r}): {message}"
    after = snapshot(tmp_path)
    new_or_changed = sorted(k for k, v in after.items() if before.get(k) != v)
    assert not new_or_changed, f"partial output left after the error: {new_or_changed}"


def test_the_suite_counts_at_least_30_cases_over_every_area():
    by_area = Counter(c.area for c in CASES)
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    assert set(by_area) == {"config", "models", "tasks", "shards", "training"}, by_area
    assert len(CASES) >= 30, f"{len(CASES)} bad-input cases: {dict(by_area)}"
