"""ACDC stage on SmolLM2 IOI (restricted graph): outputs, exactness of the final circuit, speculation."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mechflow.benchmark.acdc import Acdc
from mechflow.benchmark.config import AcdcConfig, BenchmarkConfig
from mechflow.benchmark.core import ACDC_JSON, ACDC_STEPS, acdc_outputs, run_acdc, select_batch
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph
from mechflow.config import DEFAULT_CONFIG_DIR
from mechflow.tasks import TaskDataset, prepare_task

CFG = {"n_prompts": 8, "restriction": {"last_layers": 1, "sender_last_layers": 2},
       "acdc": {"thresholds": [0.01, 0.1]}}


@pytest.mark.slow
def test_run_acdc_on_smollm2_ioi_is_exact_and_speculation_invariant(smollm2, tmp_path):
    model_cfg = yaml.safe_load((DEFAULT_CONFIG_DIR / "model" / "smollm2_135m.yaml").read_text())
    task_cfg = {**yaml.safe_load((DEFAULT_CONFIG_DIR / "task" / "ioi.yaml").read_text()), "n_prompts": 32}
    dataset = tmp_path / "dataset.jsonl"
    prepare_task(task_cfg, model_cfg=model_cfg, dataset=dataset, tokenizer=smollm2.tokenizer)
    doc = run_acdc(CFG, model_cfg=model_cfg, dataset=dataset, **acdc_outputs(tmp_path / "acdc"), model=smollm2)
    assert json.loads((tmp_path / "acdc" / ACDC_JSON).read_text()) == json.loads(json.dumps(doc))
    steps = pq.read_table(tmp_path / "acdc" / ACDC_STEPS).to_pylist()
    runs = doc["runs"]
    assert [r["threshold"] for r in runs] == [0.01, 0.1]
    assert len(steps) == 2 * doc["n_edges_restricted"]
    assert runs[0]["n_kept"] >= runs[1]["n_kept"] > 0
    assert doc["task_metric"]["m_full"] > doc["task_metric"]["m_empty"]

    # the final D of each run equals KL recomputed with the circuits package's full forward
    model, graph = smollm2.model, EdgeGraph.from_cfg(smollm2.model.cfg)
    batch = select_batch(TaskDataset.load(dataset), 8, dataset)
    restriction = EdgeRestriction.build(graph, BenchmarkConfig.from_dict(CFG).restriction)
    with torch.no_grad():
        _, corrupted = graph_forward(model, batch.corrupted_tokens, graph, record=True)
        clean = torch.log_softmax(model(batch.clean_tokens)[:, -1].double(), -1)
        for run in runs:
            kept = graph.mask_from_names(run["edges"])
            logits, _ = graph_forward(model, batch.clean_tokens, graph, corrupted=corrupted,
                                      removed=restriction.removed(kept))
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits[:, -1].double(), -1), clean,
                                            log_target=True, reduction="batchmean")
            assert abs(float(kl) - run["metric"]) < 1e-4 * max(1.0, run["metric"])

    fast = Acdc(model, batch, AcdcConfig(speculation=4), restriction).run(0.01)
    assert sorted(graph.edge_names(fast.kept)) == sorted(runs[0]["edges"])
