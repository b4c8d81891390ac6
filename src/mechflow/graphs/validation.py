"""Validation of an attribution graph by intervention (beyond circuit-tracer).

For the top-N features by influence on the answer logit, the feature's activation ``a`` is changed
by ``delta`` (``zero``: −a; ``x2``: +a; ``x-1``: −2a; the small ``x1.1`` / ``x0.9``: ±0.1a, where a
first-order prediction should hold if the model is smooth there) by adding ``delta · W_dec[f]`` to its MLP's
output at its position, and the change of the answer's demeaned logit (and of the logit difference
answer − foil, when the foil is a logit node) is measured

- in the **real model**, everything downstream free (attention, norms, the real MLPs recompute);
- in the **frozen replacement model** (`mechflow.graphs.replacement.frozen_forward`: patterns,
  norm scales, every other feature and error node fixed), where the graph's direct edge predicts
  the change exactly: ``delta / a · A[logit, s]`` (a test holds it to float rounding).

Two predictions from the graph are compared with the real model:

- ``direct``: ``delta / a · A[logit, s]`` (the edge alone);
- ``graph``: the linear effect through every path of feature nodes in the graph: downstream
  features respond to the change of their pre-activation one-for-one (JumpReLU above threshold is
  the identity) and pass it on per unit of their activation, ``M[t, u] = A[t, u] / a_u``; errors and
  tokens stay fixed. ``graph = delta · e_logitᵀ (I − M_ff)⁻¹ e_s`` summed term by term (acyclic).

Reported per graph: Pearson and Spearman correlation of the prediction with the real change, and
the fraction of interventions whose sign the prediction gets right (zero changes excluded), over
all operations and per operation. A second set, the top-N features **outside** the positions
``exclude_positions`` (`graph.validation_exclude_positions`, default the first token after BOS,
where SmolLM2 builds its attention-sink / massive-activation residual and the top features of the
first set concentrate), is validated and reported the same way (rows with ``selection`` =
``excluding_positions``): whether the graph's first-order predictions hold away from the sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from mechflow.errors import ConfigError
from mechflow.graphs.attribution import AttributionGraph
from mechflow.graphs.influence import influence, normalize_matrix
from mechflow.graphs.replacement import Perturbation, PromptState, TranscoderSet, frozen_forward

OPERATIONS = {"zero": -1.0, "x2": 1.0, "x-1": -2.0, "x1.1": 0.1, "x0.9": -0.1}  # delta / activation


def logit_node(graph: AttributionGraph, token_id: int, field: str = "answer") -> int:
    """Index (among the logit nodes) of ``token_id``; one clear error when it was not kept."""
    hits = (graph.logit_tokens == int(token_id)).nonzero().flatten().tolist()
    if not hits:
        raise ConfigError(
            f"the {field} token {token_id} is not among the graph's logit nodes {graph.logit_tokens.tolist()}: "
            "raise graph.max_n_logits / graph.desired_logit_prob, or set graph.include_answer_logits: true")
    return hits[0]


def top_features_for(graph: AttributionGraph, logit_index: int, n: int, exclude_positions: Sequence[int] = ()
                     ) -> Tensor:
    """Feature-node indices of the ``n`` features with the largest influence on one logit node
    (features at ``exclude_positions`` left out)."""
    layout = graph.layout
    weights = torch.zeros(layout.n_nodes, dtype=torch.float64)
    weights[layout.logits.start + logit_index] = 1.0
    scores = influence(normalize_matrix(graph.adjacency.double()), weights)[: layout.n_features]
    if exclude_positions:
        positions = graph.active_features[graph.selected_features, 1]
        scores = scores.masked_fill(torch.isin(positions, torch.tensor(list(exclude_positions))), 0.0)
    order = torch.argsort(scores, descending=True, stable=True)
    return order[scores[order] > 0][:n]


def graph_prediction(graph: AttributionGraph, source: int, logit_index: int) -> float:
    """Change of a logit node's demeaned logit per unit change of feature node ``source``'s
    activation, through every path of feature nodes (see the module docstring)."""
    layout = graph.layout
    m = layout.n_features
    acts = graph.activation_values[graph.selected_features].double()
    A = graph.adjacency.double()
    M_ff = A[:m, :m] / acts[None, :]
    m_lf = A[layout.logits.start + logit_index, :m] / acts
    x = torch.zeros(m, dtype=torch.float64)
    x[source] = 1.0
    total, frontier = x.clone(), x
    for _ in range(m + 1):
        frontier = M_ff @ frontier
        if not frontier.abs().max() > 0:
            break
        total += frontier
    return float(m_lf @ total)


@dataclass
class Intervention:
    node: int            # feature-node index in the graph
    layer: int
    position: int
    feature: int
    activation: float
    operation: str
    delta: float         # change of the activation
    selection: str = "top"  # top | excluding_positions


def interventions_for(graph: AttributionGraph, nodes: Tensor, operations: list[str], selection: str = "top"
                      ) -> list[Intervention]:
    unknown = sorted(set(operations) - set(OPERATIONS))
    if unknown:
        raise ConfigError(f"graph.validation.operations: unknown {unknown}; choose from {sorted(OPERATIONS)}")
    out = []
    for node in nodes.tolist():
        active = int(graph.selected_features[node])
        layer, pos, feature = graph.active_features[active].tolist()
        a = float(graph.activation_values[active])
        out.extend(Intervention(node, layer, pos, feature, a, op, OPERATIONS[op] * a, selection) for op in operations)
    return out


def _vector(transcoders: TranscoderSet, item: Intervention, dtype) -> Tensor:
    return item.delta * transcoders.transcoders[item.layer].W_dec[item.feature].to(dtype)


@torch.no_grad()
def real_model_logits(model, transcoders: TranscoderSet, tokens: Tensor, items: list[Intervention],
                      batch_size: int = 16) -> Tensor:
    """``[len(items), d_vocab]`` last-position logits of the real model with each intervention
    (one batch element each; the rest of the model runs free)."""
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]

        def add(value, hook, layer):
            for b, item in enumerate(batch):
                if item.layer == layer:
                    value[b, item.position] += _vector(transcoders, item, value.dtype)
            return value

        hooks = [(transcoders.hook_out(layer), partial(add, layer=layer)) for layer in sorted({i.layer for i in batch})]
        logits = model.run_with_hooks(tokens[None].expand(len(batch), -1), fwd_hooks=hooks)
        out.append(logits[:, -1])
    return torch.cat(out)


def frozen_model_logits(model, transcoders: TranscoderSet, state: PromptState, items: list[Intervention]) -> Tensor:
    """``[len(items), d_vocab]`` last-position logits of the frozen replacement with each intervention."""
    rows = []
    for item in items:
        extra = torch.zeros_like(state.errors[item.layer])
        extra[item.position] = _vector(transcoders, item, extra.dtype)
        rows.append(frozen_forward(model, transcoders, state, Perturbation(mlp={item.layer: extra})).logits[-1])
    return torch.stack(rows)


def demeaned(logits: Tensor, token_id: int) -> Tensor:
    return logits[..., token_id] - logits.mean(-1)


def agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float | int | None]:
    """Pearson, Spearman and the fraction of signs predicted right (pairs where either is 0 skipped)."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    signed = (predicted != 0) & (actual != 0)
    constant = len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0
    return {
        "n": int(len(predicted)),
        "pearson": None if constant else float(sps.pearsonr(predicted, actual)[0]),
        "spearman": None if constant else float(sps.spearmanr(predicted, actual)[0]),
        "sign_agreement": float(np.mean(np.sign(predicted[signed]) == np.sign(actual[signed]))) if signed.any()
        else None,
    }


def _agreements(rows: list[dict], operations: list[str], has_foil: bool) -> dict:
    """The summary's agreement block of some rows: over all operations and per operation."""
    if not rows:
        return {"n_interventions": 0}
    col = {k: np.array([r[k] for r in rows]) for k in ("predicted_graph", "predicted_direct", "real", "frozen")}
    out = {"n_interventions": len(rows), "n_features": len({r["node"] for r in rows}),
           "real_vs_graph": agreement(col["predicted_graph"], col["real"]),
           "real_vs_direct": agreement(col["predicted_direct"], col["real"]),
           "by_operation": {op: agreement([r["predicted_graph"] for r in rows if r["operation"] == op],
                                          [r["real"] for r in rows if r["operation"] == op]) for op in operations}}
    if has_foil:
        out["real_diff_vs_graph"] = agreement([r["predicted_graph_diff"] for r in rows], [r["real_diff"] for r in rows])
    return out


def validate_graph(model, transcoders: TranscoderSet, graph: AttributionGraph, state: PromptState, *,
                   answer: int, foil: int | None = None, n_features: int = 10,
                   operations: list[str] | None = None, exclude_positions: Sequence[int] = ()
                   ) -> tuple[list[dict], dict]:
    """Rows (one per intervention) and the summary of the validation of ``graph`` on its answer:
    the top ``n_features`` features, and (when ``exclude_positions`` is given) the top ones outside
    those positions (module docstring)."""
    operations = operations or list(OPERATIONS)
    a_idx = logit_node(graph, answer)
    f_idx = None
    if foil is not None and (graph.logit_tokens == int(foil)).any():
        f_idx = logit_node(graph, foil, "foil")
    nodes = top_features_for(graph, a_idx, n_features)
    items = interventions_for(graph, nodes, operations)
    if exclude_positions:
        away = top_features_for(graph, a_idx, n_features, exclude_positions)
        items += interventions_for(graph, away, operations, "excluding_positions")
    if not items:
        return [], {"answer": int(answer), "foil": foil, "n_interventions": 0}
    with torch.no_grad():
        base_real = model(state.tokens[None])[0, -1]
    real = real_model_logits(model, transcoders, state.tokens, items)
    frozen = frozen_model_logits(model, transcoders, state, items)
    base_frozen = frozen_forward(model, transcoders, state).logits[-1]
    layout = graph.layout
    rows = []
    for i, item in enumerate(items):
        unit = item.delta / item.activation
        row = {
            "node": item.node, "layer": item.layer, "position": item.position, "feature": item.feature,
            "activation": item.activation, "operation": item.operation, "delta": item.delta,
            "predicted_direct": unit * float(graph.adjacency[layout.logits.start + a_idx, item.node]),
            "predicted_graph": item.delta * graph_prediction(graph, item.node, a_idx),
            "real": float(demeaned(real[i], answer) - demeaned(base_real, answer)),
            "frozen": float(demeaned(frozen[i], answer) - demeaned(base_frozen, answer)),
            "selection": item.selection,
        }
        if f_idx is not None:
            column = graph.adjacency[layout.logits, item.node]
            edge = column[a_idx] - column[f_idx]
            row["predicted_direct_diff"] = unit * float(edge)
            row["predicted_graph_diff"] = item.delta * (graph_prediction(graph, item.node, a_idx)
                                                        - graph_prediction(graph, item.node, f_idx))
            row["real_diff"] = float((real[i, answer] - real[i, foil]) - (base_real[answer] - base_real[foil]))
        rows.append(row)
    top = [r for r in rows if r["selection"] == "top"]
    pred = np.array([r["predicted_direct"] for r in rows])
    frozen_col = np.array([r["frozen"] for r in rows])
    summary = {
        "answer": int(answer), "foil": None if foil is None else int(foil), "foil_in_graph": f_idx is not None,
        "operations": operations, **_agreements(top, operations, f_idx is not None),
        "n_interventions": len(rows),
        "frozen_vs_direct": agreement(pred, frozen_col),
        "frozen_max_abs_error": float(np.abs(pred - frozen_col).max()),
    }
    if exclude_positions:
        away_rows = [r for r in rows if r["selection"] == "excluding_positions"]
        summary["excluding_positions"] = {"positions": [int(p) for p in exclude_positions],
                                          **_agreements(away_rows, operations, f_idx is not None)}
    return rows, summary
