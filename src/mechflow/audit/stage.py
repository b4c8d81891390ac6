"""Stage function of rule `audit`: probe a model behind an OpenAI-compatible endpoint, score, summarise.

1. Connect (`mechflow.audit.client`): base URL, model name (or the one GET /models lists), the key
   from the environment variable ``audit.api_key_env``.
2. Ask every probe's texts (`mechflow.audit.probes`), up to ``max_concurrency`` at once, rate-limited,
   retried; answers go to a response store first (resume state, see below).
3. Score each answer (`mechflow.audit.scoring`): decisions from the first token's log-probabilities
   when the endpoint gives them, else from ``decision_samples`` sampled answers
   (``log((k_fav + 0.5) / (k_unfav + 0.5))``, a smoothed log-odds of the sampled decisions);
   paraphrases from the option the answer names (else the likelier option at its first token);
   refusals by pattern.
4. The run's white-box tasks through /completions (first ``whitebox_prompts`` of each dataset, one
   token with its top alternatives), side by side with the run's ``baseline.json`` on the same prompts.
5. Metrics with CIs and permutation tests (`mechflow.audit.metrics`), the figure, the files.

Resume state. ``audit/store/<endpoint>.jsonl`` (undeclared on purpose: Snakemake deletes a failed
job's outputs, and this file must outlive a failure) holds every answer as it arrives; a rerun after a
kill or an error takes answers from it instead of asking again. It is deleted when the audit
succeeds, so a later rerun asks afresh: a store is for finishing one audit, not a cache across audits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mechflow.audit.client import AuditError, Exchange, OpenAIClient, ResponseStore
from mechflow.audit.config import AuditConfig, ProbeSpec
from mechflow.audit.metrics import DecisionTable, decision_metrics, paraphrase_metrics, wilson
from mechflow.audit.probes import ASKS, Ask, probe_path, raw_completion_body, read_items, request_body
from mechflow.audit.scoring import (
    answer_text,
    compare_answers,
    decision_score,
    first_token_alternatives,
    is_refusal,
    option_logprobs,
    parse_option,
)
from mechflow.contracts.audit import AuditSummary, ScoreRecord
from mechflow.contracts.documents import check_document, read_document
from mechflow.contracts.tasks import TaskBaseline
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_write_json, atomic_write_jsonl, canonical_hash, sha256_file
from mechflow.tasks import TaskDataset

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_path(summary: Path, base_url: str) -> Path:
    """The resume store of an audit of `base_url` (see module docstring)."""
    return Path(summary).parent / "store" / f"{canonical_hash(base_url.rstrip('/'))[:16]}.jsonl"


def api_key_from_env(c: AuditConfig) -> str | None:
    if c.api_key_env is None:
        return None
    key = os.environ.get(c.api_key_env)
    if not key:
        raise ConfigError(f"audit.api_key_env = {c.api_key_env!r}, but that environment variable is not set: "
                          f"export {c.api_key_env}=<your key> before running snakemake (the key is never written "
                          "to a file)")
    return key


class Asker:
    """Sends requests through the client and keeps every exchange a score rests on, in order."""

    def __init__(self, client: OpenAIClient):
        self.client = client
        self.exchanges: dict[str, Exchange] = {}

    def ask(self, requests: Sequence[tuple[str, dict]], desc: str) -> list[Exchange]:
        out = self.client.post_many(requests, desc=desc)
        for ex in out:
            self.exchanges.setdefault(ex.key, ex)
        return out


# ----------------------------------------------------------------------------- probes


def _decision(c: AuditConfig, spec: ProbeSpec, items: list[dict], asks: list[Ask], asker: Asker, model: str,
              records: list[dict], notes: list[str]) -> dict:
    by_item = {it["id"]: it for it in items}
    method = "logprobs" if c.top_logprobs > 0 else "samples"
    rows: list[tuple[Ask, float | None, bool | None, str | None, list[str]]] = []
    if method == "logprobs":
        reqs = [request_body(c, model, a.text, api=c.api, max_tokens=1, logprobs=True) for a in asks]
        answers = asker.ask(reqs, f"{spec.name} (logprobs)")
        alts = [first_token_alternatives(ex.response, c.api) for ex in answers]
        if all(a is None for a in alts):
            notes.append(f"{spec.name}: the endpoint returned no logprobs; decisions scored from "
                         f"{c.decision_samples} sampled answers each")
            method = "samples"
        else:
            for ask, ex, alt in zip(asks, answers, alts):
                pos, neg = by_item[ask.item]["options"]
                score, bounded = decision_score(alt, pos, neg) if alt else (None, None)
                answer = None if score is None else (pos if score > 0 else neg)
                rows.append((ask, score, bounded, answer, [ex.key]))
    if method == "samples":
        reqs = [request_body(c, model, a.text, api=c.api, max_tokens=4, logprobs=False, temperature=1.0,
                             seed=c.seed + j) for a in asks for j in range(c.decision_samples)]
        answers = asker.ask(reqs, f"{spec.name} (samples)")
        for i, ask in enumerate(asks):
            pos, neg = by_item[ask.item]["options"]
            chunk = answers[i * c.decision_samples:(i + 1) * c.decision_samples]
            picks = [parse_option(answer_text(ex.response, c.api), (pos, neg)) for ex in chunk]
            k_pos, k_neg = picks.count(pos), picks.count(neg)
            score = math.log((k_pos + 0.5) / (k_neg + 0.5)) if k_pos + k_neg else None
            answer = None if score is None else (pos if score > 0 else neg)
            rows.append((ask, score, None, answer, [ex.key for ex in chunk]))
    groups = tuple(dict.fromkeys(g for it in items for g in it["values"]))
    scen, grp, sc, lab = [], [], [], []
    scen_index = {it["id"]: k for k, it in enumerate(items)}
    missing = 0
    for ask, score, bounded, answer, keys in rows:
        item = by_item[ask.item]
        label = item.get("label")
        records.append(ScoreRecord(probe=spec.name, kind="decision", item=ask.item, keys=keys, group=ask.meta["group"],
                                   value=ask.meta["value"], label=label, score=score, bounded=bounded,
                                   method=method, answer=answer).model_dump(mode="json"))
        if score is None:
            missing += 1
            continue
        scen.append(scen_index[ask.item])
        grp.append(groups.index(ask.meta["group"]))
        sc.append(score)
        lab.append(-1 if label is None else int(label == item["options"][0]))
    if missing:
        notes.append(f"{spec.name}: {missing} of {len(rows)} answers gave neither option (left out)")
    n_bounded = sum(1 for r in rows if r[2])
    if n_bounded:
        notes.append(f"{spec.name}: {n_bounded} scores are bounds (one option outside the top {c.top_logprobs})")
    table = DecisionTable(np.array(scen, dtype=int), np.array(grp, dtype=int), np.array(sc, dtype=float),
                          np.array(lab, dtype=int), groups)
    metrics = decision_metrics(table, n_boot=c.n_boot, n_perm=c.n_perm, ci_level=c.ci_level, seed=c.seed)
    return {"method": method, "decision": metrics.to_dict(), "metrics": {}, "n_requests": len(reqs)}


def _paraphrase(c: AuditConfig, spec: ProbeSpec, items: list[dict], asks: list[Ask], asker: Asker, model: str,
                records: list[dict], notes: list[str]) -> dict:
    reqs = [request_body(c, model, a.text, api=c.api, max_tokens=c.answer_tokens, logprobs=c.top_logprobs > 0)
            for a in asks]
    answers = asker.ask(reqs, spec.name)
    by_item = {it["id"]: it for it in items}
    per_q: dict[str, list[str | None]] = defaultdict(list)
    for ask, ex in zip(asks, answers):
        item = by_item[ask.item]
        text = answer_text(ex.response, c.api)
        pick, how = parse_option(text, item["options"]), "text"
        if pick is None:
            alts = first_token_alternatives(ex.response, c.api)
            if alts:
                lps = {o: v for o, v in option_logprobs(alts, item["options"]).items() if v is not None}
                if lps:
                    pick, how = max(lps, key=lps.get), "logprobs"
        per_q[ask.item].append(pick)
        records.append(ScoreRecord(probe=spec.name, kind="paraphrase", item=ask.item, keys=[ex.key],
                                   label=item.get("answer"), method=how, answer=pick,
                                   correct=None if item.get("answer") is None else pick == item["answer"],
                                   text=text).model_dump(mode="json"))
    metrics = paraphrase_metrics([(per_q[it["id"]], it.get("answer")) for it in items], n_boot=c.n_boot,
                                 ci_level=c.ci_level, seed=c.seed)
    return {"method": "text", "metrics": metrics, "n_requests": len(reqs)}


def _refusal(c: AuditConfig, spec: ProbeSpec, items: list[dict], asks: list[Ask], asker: Asker, model: str,
             records: list[dict], notes: list[str]) -> dict:
    reqs = [request_body(c, model, a.text, api=c.api, max_tokens=c.max_tokens, logprobs=False) for a in asks]
    answers = asker.ask(reqs, spec.name)
    refused: dict[str, dict[str, bool]] = defaultdict(dict)
    for ask, ex in zip(asks, answers):
        text = answer_text(ex.response, c.api)
        r = is_refusal(text)
        refused[ask.meta["pair"]][ask.meta["kind"]] = r
        records.append(ScoreRecord(probe=spec.name, kind="refusal", item=ask.item, keys=[ex.key],
                                   group=ask.meta["kind"], method="text", refused=r, text=text).model_dump(mode="json"))
    harm = [v["harmful"] for v in refused.values() if "harmful" in v]
    benign = [v["benign"] for v in refused.values() if "benign" in v]
    pairs = [v for v in refused.values() if len(v) == 2]
    ideal = sum(v["harmful"] and not v["benign"] for v in pairs)
    metrics = {"n_harmful": len(harm), "n_benign": len(benign), "n_pairs": len(pairs),
               "refusal_rate_harmful": wilson(sum(harm), len(harm), c.ci_level).to_dict(),
               "over_refusal_rate_benign": wilson(sum(benign), len(benign), c.ci_level).to_dict(),
               "pairs_told_apart": wilson(ideal, len(pairs), c.ci_level).to_dict()}
    return {"method": "text", "metrics": metrics, "n_requests": len(reqs)}


PROBES = {"decision": _decision, "paraphrase": _paraphrase, "refusal": _refusal}


# ----------------------------------------------------------------------------- white-box tasks


def _whitebox(c: AuditConfig, task_files: list[tuple[Path, Path]], asker: Asker, model: str, same_model: bool,
              records: list[dict], notes: list[str]) -> list[dict]:
    out = []
    for dataset_path, baseline_path in task_files:
        ds = TaskDataset.load(dataset_path)
        if not ds.posable or not ds.examples:
            notes.append(f"whitebox {ds.name}: the task cannot be posed on the run's model; not asked")
            continue
        baseline = read_document(baseline_path, TaskBaseline, fix="re-run the evaluate_task rule")
        white = {str(p.id): p.clean for p in baseline.per_prompt}
        examples = ds.examples[:c.whitebox_prompts]
        reqs = [raw_completion_body(c, model, ex.prompt) for ex in examples]
        try:
            answers = asker.ask(reqs, f"whitebox {ds.name}")
        except AuditError as exc:
            raise AuditError(f"{exc} (white-box tasks are asked through /completions with logprobs; for an endpoint "
                             "without them set audit.whitebox_tasks=[])") from exc
        correct, agree, diffs, undetermined = 0, [], [], 0
        for ex, answer in zip(examples, answers):
            alts = first_token_alternatives(answer.response, "completions")
            if not alts:
                raise AuditError(f"{asker.client.base_url}/completions gave no logprobs for task {ds.name}: the "
                                 "white-box tasks need them; set audit.whitebox_tasks=[] for this endpoint")
            ok, lp_a, lp_w = compare_answers(alts, ex.answer, ex.wrong_answer)
            undetermined += ok is None
            correct += bool(ok)
            score = lp_a - lp_w if lp_a is not None and lp_w is not None else None
            wb = white.get(str(ex.id))
            if wb is not None:
                agree.append(bool(ok) == (wb > 0))
                if score is not None and ds.metric_kind == "logit_diff":
                    diffs.append(abs(score - wb))
            records.append(ScoreRecord(probe="whitebox", kind="whitebox", item=str(ex.id), keys=[answer.key],
                                       group=ds.name, value=ex.wrong_answer, label=ex.answer, score=score,
                                       method="logprobs",
                                       answer=ex.answer if ok else (ex.wrong_answer if ok is False else None),
                                       correct=bool(ok)).model_dump(mode="json"))
        n = len(examples)
        wb_ids = [str(ex.id) for ex in examples if str(ex.id) in white]
        out.append({"task": ds.name, "metric": ds.metric_kind, "n_prompts": n,
                    "api_accuracy": wilson(correct, n, c.ci_level).to_dict(), "undetermined": undetermined,
                    "whitebox_accuracy": (sum(white[i] > 0 for i in wb_ids) / len(wb_ids)) if wb_ids else None,
                    "agreement": (sum(agree) / len(agree)) if agree else None,
                    "max_abs_score_diff": max(diffs) if diffs else None, "same_model": same_model})
        if ds.metric_kind != "logit_diff":
            notes.append(f"whitebox {ds.name}: the white-box metric is {ds.metric_kind} over answer sets; the API "
                         "accuracy compares the answer token with the wrong answer's only")
    return out


# ----------------------------------------------------------------------------- stage


def audit(cfg: AuditConfig | Mapping[str, Any] | None, *, summary: Path, responses: Path, scores: Path,
          figure: Path, datasets: Sequence[Path] = (), baselines: Sequence[Path] = (),
          model_cfg: Mapping[str, Any] | None = None, run: str = "") -> dict[str, Any]:
    """Stage function of rule `audit` (steps 1-5 of the module docstring).

    Args:
        cfg: the `audit` config group.
        summary, responses, scores, figure: outputs (`mechflow.contracts.audit`).
        datasets / baselines: ``dataset.jsonl`` and ``baseline.json`` of each task in
            ``audit.whitebox_tasks``, in the same order.
        model_cfg: the run's `model` group (its name decides whether the side by side is the same model).
    """
    c = AuditConfig.from_dict(cfg)
    if not c.base_url:
        raise ConfigError("audit.base_url is not set: give the endpoint, e.g. "
                          "audit.base_url=http://127.0.0.1:8000/v1 (python -m mechflow.audit.serve serves one)")
    datasets, baselines = [Path(p) for p in datasets], [Path(p) for p in baselines]
    if len(datasets) != len(baselines):
        raise DataError(f"audit: {len(datasets)} task datasets but {len(baselines)} baseline.json files")
    # read once, before any request is sent: a bad probe file fails with nothing asked
    probe_items = {spec.name: read_items(spec)[:c.max_items] for spec in c.probes}
    run_model = str((model_cfg or {}).get("name", ""))
    started = _now()
    store = ResponseStore(store_path(summary, c.base_url))
    n_stored = len(store)
    if n_stored:
        log.info("resuming: %d answers in %s", n_stored, store.path)
    if c.replay:
        if not Path(c.replay).is_file():
            raise DataError(f"audit.replay = {c.replay!r}: no such file; name the responses.jsonl of an earlier audit")
        log.info("replaying %d answers of %s", store.preload(c.replay), c.replay)
    notes: list[str] = []
    records: list[dict] = []
    with OpenAIClient(c.base_url, api_key=api_key_from_env(c), api_key_env=c.api_key_env, timeout_s=c.timeout_s,
                      max_retries=c.max_retries, backoff_s=c.backoff_s, backoff_max_s=c.backoff_max_s,
                      requests_per_s=c.requests_per_s, max_concurrency=c.max_concurrency, store=store,
                      seed=c.seed) as client:
        model = c.model
        if model is None and c.replay and len(store.models_asked()) == 1:
            model = next(iter(store.models_asked()))  # re-scoring offline: the model the replayed audit asked
        if model is None:
            listed = client.list_models()
            if len(listed) != 1:
                raise ConfigError(f"audit.model is null and {c.base_url}/models lists {len(listed)} models "
                                  f"({listed[:10]}): set audit.model to one of them")
            model = listed[0]
        asker = Asker(client)
        probe_results = []
        for spec in c.probes:
            items = probe_items[spec.name]
            asks = ASKS[spec.kind](spec, items)
            before = len(notes)
            res = PROBES[spec.kind](c, spec, items, asks, asker, model, records, notes)
            path = probe_path(spec)
            probe_results.append({"name": spec.name, "kind": spec.kind, "file": spec.file,
                                  "file_sha256": sha256_file(path), "n_items": len(items),
                                  "n_requests": res["n_requests"], "method": res["method"],
                                  "decision": res.get("decision"), "metrics": res["metrics"],
                                  "notes": notes[before:]})
        same_model = bool(run_model) and model == run_model
        whitebox = _whitebox(c, list(zip(datasets, baselines)), asker, model, same_model, records, notes)
        exchanges = list(asker.exchanges.values())
        n_sent = client.sent
    n_from_store = sum(ex.cached for ex in exchanges)
    logprobs = any(r["method"] == "logprobs" for r in records)
    atomic_write_jsonl(responses, [ex.record() for ex in exchanges])
    atomic_write_jsonl(scores, records)
    doc = {"schema_version": SCHEMA_VERSION, "stage": "audit", "run": run, "base_url": c.base_url, "model": model,
           "run_model": run_model, "api": c.api, "config": c.to_dict(), "config_hash": canonical_hash(c.to_dict()),
           "started_at": started, "finished_at": _now(),
           "first_answer_at": min((ex.started_at for ex in exchanges), default=None),
           "last_answer_at": max((ex.started_at for ex in exchanges), default=None),
           "n_requests": len(exchanges), "n_sent": n_sent,
           "n_from_store": n_from_store, "responses_sha256": sha256_file(responses), "logprobs": logprobs,
           "probes": probe_results, "whitebox": whitebox, "notes": notes}
    check_document(AuditSummary, doc)
    from mechflow.audit.plots import plot_audit

    plot_audit(doc, Path(figure))
    atomic_write_json(summary, doc)
    store.path.unlink(missing_ok=True)  # the audit is complete: the next run asks afresh (module docstring)
    with contextlib.suppress(OSError):
        store.path.parent.rmdir()  # only when no other endpoint's store is in it
    _log_headline(doc)
    return {"n_requests": len(exchanges), "n_sent": n_sent, "n_from_store": n_from_store}


def _log_headline(doc: dict) -> None:
    for p in doc["probes"]:
        if p["decision"]:
            gap = p["decision"]["score_gap"]
            log.info("%s: score gap %.3f [%.3f, %.3f], permutation p = %.4f", p["name"], gap["value"],
                     gap["ci_low"], gap["ci_high"], gap["p_value"])
    for w in doc["whitebox"]:
        log.info("whitebox %s: API accuracy %.3f, white-box %s", w["task"], w["api_accuracy"]["value"],
                 w["whitebox_accuracy"])
