"""Task baselines on the embedded models (SmolLM2-135M, Gemma-3-270M) through both stage functions.

Thresholds were set after measuring (64 IOI prompts, SmolLM2 with <|endoftext|> BOS: accuracy
0.97, mean logit difference 4.6) and leave wide margins; they check that the task is posed so the
model can do it, not a tuned number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mechflow.tasks import TaskDataset, evaluate_task, final_logits, prepare_task

REPO = Path(__file__).resolve().parents[2]
TASKS = {"ioi": 32, "factual_recall": 16, "greater_than": 18, "jsonl_example": 8}


def _task_cfg(name: str) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "task" / f"{name}.yaml").read_text())
    cfg["n_prompts"] = min(cfg["n_prompts"], TASKS[name])
    if cfg["kind"] == "jsonl":
        cfg["path"] = str(REPO / cfg["path"])
    return cfg


def _model_cfg(loaded) -> dict:
    card = loaded.card
    bos = loaded.tokenizer.convert_ids_to_tokens(card.bos_token_id) if card.bos_token_id is not None else None
    return {"name": card.name, "dtype": card.dtype, "prepend_bos": card.prepend_bos, "bos_token": bos}


def _run_all(loaded, tmp_path) -> dict:
    out = {}
    for name in TASKS:
        cfg = _task_cfg(name)
        folder = tmp_path / loaded.card.name / name
        prepare_task(cfg, model_cfg=_model_cfg(loaded), dataset=folder / "dataset.jsonl", tokenizer=loaded.tokenizer)
        result = evaluate_task(cfg, model_cfg=_model_cfg(loaded), dataset=folder / "dataset.jsonl",
                               baseline=folder / "baseline.json", model=loaded)
        assert json.loads((folder / "baseline.json").read_text())["verdict"] == result["verdict"]
        assert result["n_prompts"] == cfg["n_prompts"] == len(result["per_prompt"])
        assert all(math.isfinite(r["clean"]) and math.isfinite(r["corrupted"]) for r in result["per_prompt"])
        out[name] = result
    return out


def _check_final_logits(loaded, tmp_path):
    ds = TaskDataset.load(tmp_path / loaded.card.name / "ioi" / "dataset.jsonl")
    tokens = ds.buckets()[0].clean_tokens[:2]
    with torch.no_grad():
        full = loaded.model(tokens)[:, -1]
    assert torch.allclose(final_logits(loaded.model, tokens), full, atol=1e-4)


@pytest.mark.slow
def test_smollm2_baselines(smollm2, tmp_path):
    results = _run_all(smollm2, tmp_path)
    ioi = results["ioi"]
    assert ioi["accuracy"] >= 0.8 and ioi["clean_metric_mean"] > 1.0, ioi
    assert abs(ioi["corrupted_metric_mean"]) < 1.0  # ABC removes who the indirect object is
    for name, result in results.items():
        if name != "jsonl_example":  # the 8-line file demonstrates the format; it is no benchmark
            assert result["verdict"] == "above chance", (name, result["verdict"])
    _check_final_logits(smollm2, tmp_path)


@pytest.mark.slow
def test_gemma3_baselines(gemma3, tmp_path):
    results = _run_all(gemma3, tmp_path)
    for name, result in results.items():
        if name != "jsonl_example":
            assert result["verdict"] == "above chance", (name, result["verdict"])
    _check_final_logits(gemma3, tmp_path)
