"""``circuit.json``: a circuit with everything needed to recompute its faithfulness from the file.

The file holds the model config, the graph size, the circuit's unit (``"edges"`` or ``"nodes"``),
its edges (with scores; empty for a node circuit) and nodes (with scores for a node circuit),
m(N), m(empty), m(C), f, the target, the token ids of every clean/corrupted prompt, the metric
spec, the search config and its hash. `reevaluate_circuit` recomputes m(N), m(empty), m(C) and f
from the file alone with implementations INDEPENDENT of the search's: for edges TransformerLens'
own split-q/k/v-input and attention-result hooks, patched in Python per receiver (not
`graph_forward`); for nodes the per-head ``hook_result`` (not the search's ``hook_z``).

The file's layout is the contract `mechflow.contracts.circuits.CircuitFile` (re-exported here).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from mechflow.circuits.faithfulness import normalized_faithfulness
from mechflow.circuits.forward import tl_flags
from mechflow.circuits.graph import EdgeGraph
from mechflow.contracts.circuits import (  # noqa: F401  (re-exported: the circuits package's names)
    CircuitEdgeEntry,
    CircuitFile,
    CircuitNodeEntry,
    CurvePointEntry,
    LogitDiffSpec,
    PromptSet,
    TargetMetricSpec,
)
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_write_text

log = logging.getLogger(__name__)


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
    flags = {"use_split_qkv_input": True, "ungroup_grouped_query_attention": True,
                 "use_attn_result": True, "use_hook_mlp_in": True}

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


@torch.no_grad()
def tl_node_patched_logits(model, clean: Tensor, corrupted: Tensor, kept: Tensor) -> Tensor:
    """Reference node patching through TransformerLens hooks: every node NOT in ``kept`` (bool
    ``[n_senders]``, the edge graph's sender order) gets its corrupted-run value.

    Nodes: ``blocks.0.hook_resid_pre`` (input), ``blocks.L.attn.hook_result`` per head (the
    head's ``z W_O``; bias and any post-attention norm are applied after it, i.e. recomputed), and
    ``blocks.L.hook_mlp_out`` (after any post-MLP norm: the MLP's contribution to the residual).
    Independent of `mechflow.circuits.nodes.NodeEvaluator`, which patches ``hook_z``.
    """
    g = EdgeGraph.from_cfg(model.cfg)
    kept = kept.bool()
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{L}.{h}" for L in range(g.n_layers)
                                           for h in ("attn.hook_result", "hook_mlp_out")]
    with tl_flags(model, use_attn_result=True):
        _, cache = model.run_with_cache(corrupted, names_filter=lambda n: n in names)

        def put(name: str, heads: list[int] | None):
            def hook(act: Tensor, hook=None) -> Tensor:
                act = act.clone()
                if heads is None:
                    act[:] = cache[name]
                else:
                    act[:, :, heads] = cache[name][:, :, heads]
                return act
            return hook

        hooks = [] if bool(kept[0]) else [("blocks.0.hook_resid_pre", put("blocks.0.hook_resid_pre", None))]
        for L in range(g.n_layers):
            heads = [h for h in range(g.n_heads) if not bool(kept[g.head_sender(L, h)])]
            if heads:
                hooks.append((f"blocks.{L}.attn.hook_result", put(f"blocks.{L}.attn.hook_result", heads)))
            if not bool(kept[g.mlp_sender(L)]):
                hooks.append((f"blocks.{L}.hook_mlp_out", put(f"blocks.{L}.hook_mlp_out", None)))
        return model.run_with_hooks(clean, fwd_hooks=hooks)


def reevaluate_circuit(path_or_file: str | Path | CircuitFile, model=None) -> dict[str, float]:
    """Recompute m(N), m(empty), m(C) and f from a circuit.json alone (independent code path).

    Args:
        path_or_file: the file or its parsed `CircuitFile` (edge or node circuit).
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
    if cf.unit == "nodes":
        lookup = {n: i for i, n in enumerate(g.sender_names)}
        unknown = [n for n in cf.nodes if n not in lookup]
        if unknown:
            raise DataError(f"circuit.json: node {unknown[0]!r} is not a node of a {g.n_layers} x {g.n_heads} model "
                            f"(names: input, a{{L}}.h{{h}}, m{{L}}); regenerate the file with the circuit stage.")
        kept = torch.zeros(g.n_senders, dtype=torch.bool)
        kept[[lookup[n] for n in cf.nodes]] = True

        def m_nodes(keep: Tensor) -> float:
            return float(metric(tl_node_patched_logits(model, clean, corrupted, keep)).double().mean())

        m_full, m_empty, m_c = m_nodes(torch.ones_like(kept)), m_nodes(torch.zeros_like(kept)), m_nodes(kept)
    else:
        kept = g.mask_from_names([e.name for e in cf.edges])

        def m(removed: Tensor) -> float:
            return float(metric(tl_edge_patched_logits(model, clean, corrupted, removed)).double().mean())

        m_full = m(torch.zeros_like(g.valid))
        m_empty = m(g.valid.clone())
        m_c = m(g.valid & ~kept)
    return {"m_full": m_full, "m_empty": m_empty, "m_circuit": m_c,
            "faithfulness": normalized_faithfulness(m_c, m_full, m_empty)}
