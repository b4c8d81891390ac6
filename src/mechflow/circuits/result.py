"""``circuit.json``: a circuit with everything needed to recompute its faithfulness from the file.

The file holds the model config, the graph size, the circuit's edges (with scores) and nodes,
m(N), m(empty), m(C), f, the target, the token ids of every clean/corrupted prompt, the metric
spec, the search config and its hash. `reevaluate_circuit` recomputes m(N), m(empty), m(C) and f
from the file alone with an implementation INDEPENDENT of `graph_forward`: TransformerLens' own
split-q/k/v-input and attention-result hooks, patched in Python per receiver.

The pydantic model is a proposal for `mechflow.contracts.models` (it lives here until the lead
moves it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, BaseModel, ConfigDict
from torch import Tensor

from mechflow.circuits.faithfulness import normalized_faithfulness
from mechflow.circuits.forward import tl_flags
from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_write_text

log = logging.getLogger(__name__)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogitDiffSpec(_Doc):
    """metric(logits)[i] = logits[i, position, correct_ids[i]] - logits[i, position, incorrect_ids[i]]."""

    kind: Literal["logit_diff"] = "logit_diff"
    position: int = -1
    correct_ids: list[int]
    incorrect_ids: list[int]

    def build(self):
        pos = self.position
        correct, incorrect = torch.tensor(self.correct_ids), torch.tensor(self.incorrect_ids)

        def metric(logits: Tensor) -> Tensor:
            rows = torch.arange(logits.shape[0])
            return logits[rows, pos, correct] - logits[rows, pos, incorrect]

        return metric


class TargetMetricSpec(_Doc):
    """metric(logits)[i] = sum_j sign[i][j] * v[i, position, target_ids[i][j]] with v = logits (``logit``)
    or their softmax (``prob``): the tasks' logit and probability differences (`TaskBatch.metric`)."""

    kind: Literal["targets"] = "targets"
    value: Literal["logit", "prob"]
    position: int = -1
    target_ids: list[list[int]]
    target_signs: list[list[float]]

    @classmethod
    def from_task_batch(cls, batch) -> "TargetMetricSpec":
        return cls(value="prob" if batch.metric_kind == "prob_diff" else "logit",
                   target_ids=batch.target_ids.tolist(), target_signs=batch.target_signs.double().tolist())

    def build(self):
        pos = self.position
        ids, signs = torch.tensor(self.target_ids), torch.tensor(self.target_signs)

        def metric(logits: Tensor) -> Tensor:
            last = logits[:, pos, :]
            values = last.softmax(dim=-1) if self.value == "prob" else last
            return (values.gather(-1, ids) * signs.to(values.dtype)).sum(dim=-1)

        return metric


class PromptSet(_Doc):
    clean_tokens: list[list[int]]
    corrupted_tokens: list[list[int]]
    prompt_ids: list[str] | None = None
    dataset_sha256: str | None = None


class CircuitEdgeEntry(_Doc):
    name: str
    score: float


class CurvePointEntry(_Doc):
    percent: float
    n_edges: int
    metric: float
    faithfulness: float


class CircuitFile(_Doc):
    """``results/circuits/{model}/{task}/circuit.json``."""

    schema_version: Literal["1"] = "1"
    model: dict
    n_layers: int
    n_heads: int
    n_edges_total: int
    level: Literal["edge"] = "edge"
    method: str
    config: dict
    config_hash: str
    target: float
    edges: list[CircuitEdgeEntry]
    nodes: list[str]
    n_edges: int
    m_full: float
    m_empty: float
    m_circuit: float
    faithfulness: float
    faithfulness_one_fewer: float
    sufficiency: float
    comprehensiveness: float
    f1: float
    curve: list[CurvePointEntry]
    cpr: float
    cmd: float
    n_evaluations: int
    metric: Annotated[LogitDiffSpec | TargetMetricSpec, Field(discriminator="kind")]
    prompts: PromptSet


def write_circuit(path: str | Path, circuit: CircuitFile) -> Path:
    return atomic_write_text(path, circuit.model_dump_json(indent=1))


def read_circuit(path: str | Path) -> CircuitFile:
    try:
        return CircuitFile.model_validate_json(Path(path).read_text())
    except Exception as exc:  # pydantic ValidationError or JSON error: name the file
        raise DataError(f"{path}: not a valid circuit.json ({exc}); regenerate it with the circuits stage.") from exc


@torch.no_grad()
def tl_edge_patched_logits(model, clean: Tensor, corrupted: Tensor, removed: Tensor) -> Tensor:
    """Reference edge patching through TransformerLens hooks, one receiver at a time.

    Senders: ``blocks.0.hook_resid_pre`` (input), ``blocks.L.attn.hook_result`` (heads),
    ``blocks.L.hook_mlp_out``; receivers: ``blocks.L.hook_{q,k,v}_input`` (per query head with
    ``ungroup_grouped_query_attention``), ``blocks.L.hook_mlp_in``, and the last block's
    ``hook_resid_post`` (the input of ``ln_final``, i.e. the logits receiver).
    """
    g = EdgeGraph.from_cfg(model.cfg)
    H = g.n_heads
    removed = removed & g.valid
    flags = dict(use_split_qkv_input=True, ungroup_grouped_query_attention=True,
                 use_attn_result=True, use_hook_mlp_in=True)

    def sender_acts(store: dict[int, Tensor]):
        def put_input(act, hook):
            store[0] = act
        def put_heads(act, hook, L):
            for h in range(H):
                store[g.head_sender(L, h)] = act[:, :, h]
        def put_mlp(act, hook, L):
            store[g.mlp_sender(L)] = act
        hooks = [("blocks.0.hook_resid_pre", put_input)]
        for L in range(g.n_layers):
            hooks.append((f"blocks.{L}.attn.hook_result", lambda a, hook, L=L: put_heads(a, hook, L)))
            hooks.append((f"blocks.{L}.hook_mlp_out", lambda a, hook, L=L: put_mlp(a, hook, L)))
        return hooks

    with tl_flags(model, **flags):
        corr: dict[int, Tensor] = {}
        model.run_with_hooks(corrupted, fwd_hooks=sender_acts(corr))
        cur: dict[int, Tensor] = {}

        def correction(r: int) -> Tensor | float:
            total = 0.0
            for s in removed[:, r].nonzero().flatten().tolist():
                total = total + (corr[s] - cur[s])
            return total

        def qkv_hook(act, hook, L, kind):
            act = act.clone()
            for h in range(H):
                act[:, :, h] = act[:, :, h] + correction(g.qkv_receiver(L, kind, h))
            return act

        hooks = sender_acts(cur)
        for L in range(g.n_layers):
            for kind in "qkv":
                hooks.append((f"blocks.{L}.hook_{kind}_input", lambda a, hook, L=L, k=kind: qkv_hook(a, hook, L, k)))
            hooks.append((f"blocks.{L}.hook_mlp_in",
                          lambda a, hook, L=L: a + correction(g.mlp_receiver(L))))
        hooks.append((f"blocks.{g.n_layers - 1}.hook_resid_post",
                      lambda a, hook: a + correction(g.logits_receiver)))
        # senders must be recorded before receivers of the same hook call order: TL fires hooks in
        # forward order, and every sender of a receiver runs earlier in the forward pass.
        return model.run_with_hooks(clean, fwd_hooks=hooks)


def reevaluate_circuit(path_or_file: str | Path | CircuitFile, model=None) -> dict[str, float]:
    """Recompute m(N), m(empty), m(C) and f from a circuit.json alone (independent code path).

    Args:
        path_or_file: the file or its parsed `CircuitFile`.
        model: the model to use; default loads ``file.model`` with `mechflow.models.load_model_from_cfg`.
    """
    cf = path_or_file if isinstance(path_or_file, CircuitFile) else read_circuit(path_or_file)
    if model is None:
        from mechflow.models import load_model_from_cfg

        model = load_model_from_cfg(cf.model).model
    g = EdgeGraph(cf.n_layers, cf.n_heads)
    if (model.cfg.n_layers, model.cfg.n_heads) != (g.n_layers, g.n_heads):
        raise ConfigError(f"model: {model.cfg.model_name!r} has {model.cfg.n_layers} layers x "
                          f"{model.cfg.n_heads} heads but the circuit file was made for "
                          f"{g.n_layers} x {g.n_heads}; pass the model the circuit was found on.")
    clean = torch.tensor(cf.prompts.clean_tokens)
    corrupted = torch.tensor(cf.prompts.corrupted_tokens)
    metric = cf.metric.build()
    kept = g.mask_from_names([e.name for e in cf.edges])

    def m(removed: Tensor) -> float:
        return float(metric(tl_edge_patched_logits(model, clean, corrupted, removed)).double().mean())

    m_full = m(torch.zeros_like(g.valid))
    m_empty = m(g.valid.clone())
    m_c = m(g.valid & ~kept)
    return {"m_full": m_full, "m_empty": m_empty, "m_circuit": m_c,
            "faithfulness": normalized_faithfulness(m_c, m_full, m_empty)}
