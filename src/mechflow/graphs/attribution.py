"""The attribution graph of one prompt: direct effects between nodes of the local replacement model,
one adjacency row per target from batched backward passes.

Definitions (circuit-tracer's `attribution.py`: `AttributionContext`, `compute_salient_logits`,
`compute_partial_influences`, `_run_attribution`):

- Nodes ``[features, errors, tokens, logits]`` (`mechflow.graphs.influence.GraphLayout`): the
  active transcoder features (every one, or a budget of them chosen by influence), one error node
  per (layer, position), one token-embedding node per position, and the top logits of the last
  position (smallest set with cumulative probability ≥ ``desired_logit_prob``, at most
  ``max_n_logits``).
- ``A[t, s]`` is the direct effect of source ``s`` on target ``t`` in the frozen system
  (`mechflow.graphs.replacement`): for a feature target, on its **pre-activation**
  ``x_l · W_enc[:, f]``; for a logit target, on its **demeaned logit**
  ``final · (W_U[:, v] − mean_v' W_U[:, v'])``. Because the frozen system is linear, that effect is
  the gradient of the target w.r.t. the source's output vector, contracted with it:
  ``A[t, s] = ∂target/∂out_s · v_s`` with ``v_s = a_s W_dec[s]`` (feature), the error vector
  (error node) or the token embedding (token node).
- One backward pass computes up to ``batch_size`` rows: the prompt is run once with that many
  copies; each copy gets its own target's vector as the output gradient at its hook (the
  transcoder input of the target's layer, or the unembedding input), and ``torch.autograd.grad``
  returns the gradients at every MLP output and the embeddings at once. Gradients stop at the MLP
  outputs (the replacement's MLPs are features + errors, all nodes), at attention patterns and at
  norm scales (frozen), so each row holds direct effects only.
- With a feature budget, rows are computed in the order of influence on the logits as the graph
  grows (circuit-tracer's loop: logit rows first, then repeatedly the most influential unvisited
  features given the rows so far, re-ranked every ``update_interval`` batches). The features of
  one re-ranking are then batched by layer (circuit-tracer batches them in rank order): the same
  rows, but a pass whose targets sit in low layers stops its backward there.

Written on TransformerLens hooks of mechflow's own model instead of circuit-tracer's
`ReplacementModel` (a HookedTransformer subclass), because circuit-tracer cannot share mechflow's
environment (`mechflow.graphs.influence`), and to use ``autograd.grad`` with several outputs in
place of its gradient-overriding tensor hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.errors import ConfigError
from mechflow.graphs.influence import GraphLayout
from mechflow.graphs.replacement import PromptState, TranscoderSet, is_frozen, setup_prompt


@dataclass
class AttributionGraph:
    """An unpruned attribution graph (the fields of circuit-tracer's `Graph`)."""

    tokens: Tensor               # [P] prompt token ids
    logit_tokens: Tensor         # [K] vocabulary ids of the logit nodes
    logit_probabilities: Tensor  # [K]
    active_features: Tensor      # [n, 3] (layer, position, feature) of every active feature
    activation_values: Tensor    # [n]
    selected_features: Tensor    # [m] indices into active_features: the feature nodes, in order
    adjacency: Tensor            # [N, N] A[target, source], N = m + L*P + P + K
    n_layers: int

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def layout(self) -> GraphLayout:
        return GraphLayout(n_features=int(self.selected_features.shape[0]), n_errors=self.n_layers * self.n_pos,
                           n_tokens=self.n_pos, n_logits=int(self.logit_tokens.shape[0]))


@torch.no_grad()
def salient_logits(logits: Tensor, W_U: Tensor, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                   include: Sequence[int] = ()) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids [K], probabilities [K], demeaned unembedding columns [K, d_model])`` of the smallest set
    of top logits whose cumulative probability reaches ``desired_logit_prob``, at most
    ``max_n_logits`` (circuit-tracer's `compute_salient_logits`); token ids in ``include`` (a task's
    answer and foil) are appended when that set misses them."""
    if max_n_logits < 1:
        raise ConfigError(f"graph.max_n_logits = {max_n_logits}: keep at least one logit")
    if not 0 < desired_logit_prob <= 1:
        raise ConfigError(f"graph.desired_logit_prob = {desired_logit_prob}: a probability in (0, 1]")
    probs = torch.softmax(logits.double(), dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_n_logits, probs.shape[-1]))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(desired_logit_prob, dtype=top_p.dtype))) + 1
    top_p, top_idx = top_p[:cutoff], top_idx[:cutoff]
    missing = [int(t) for t in dict.fromkeys(include) if int(t) not in set(top_idx.tolist())]
    if missing:
        extra = torch.tensor(missing, dtype=top_idx.dtype)
        top_idx, top_p = torch.cat([top_idx, extra]), torch.cat([top_p, probs[extra]])
    demeaned = W_U[:, top_idx] - W_U.mean(dim=-1, keepdim=True)
    return top_idx, top_p.to(logits.dtype), demeaned.T


@contextmanager
def _no_parameter_grads(model):
    """Parameters are constants of the frozen system: no graph is kept for them (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class BackwardEngine:
    """The frozen system of one prompt, run forward once with ``batch_size`` copies; `rows` returns
    the adjacency rows (over source columns ``[active features, errors, tokens]``) of a batch of
    targets given as (injection layer, position, vector); layer ``n_layers`` is the unembedding
    input (logit targets)."""

    def __init__(self, model, transcoders: TranscoderSet, state: PromptState, batch_size: int):
        self.state, self.batch_size = state, batch_size
        L, P = state.n_layers, state.n_pos
        index, values = state.active_features()
        self.feature_index = index
        dtype = state.inputs.dtype
        dec = torch.cat([transcoders.transcoders[layer].W_dec.to(dtype)[index[index[:, 0] == layer, 2]]
                         for layer in range(L)]) if len(index) else torch.zeros(0, state.errors.shape[-1], dtype=dtype)
        self.decoder_vectors = dec * values[:, None]                  # a_s W_dec[s]
        counts = torch.bincount(index[:, 0], minlength=L) if len(index) else torch.zeros(L, dtype=torch.long)
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
        self.spans = [(bounds[layer], bounds[layer + 1]) for layer in range(L)]
        # features are sorted by (layer, position): per layer, the column blocks of each position
        self.blocks: list[list[tuple[int, int, int]]] = []
        for start, end in self.spans:
            pos = index[start:end, 1]
            per_pos = torch.bincount(pos, minlength=P) if end > start else torch.zeros(P, dtype=torch.long)
            edges = (start + torch.cat([torch.zeros(1, dtype=torch.long), per_pos.cumsum(0)])).tolist()
            self.blocks.append([(p, edges[p], edges[p + 1]) for p in range(P) if edges[p + 1] > edges[p]])
        self.n_sources = len(index) + L * P + P
        self._forward(model, transcoders)

    def _forward(self, model, transcoders: TranscoderSet) -> None:
        state, B, L = self.state, self.batch_size, self.state.n_layers
        points: list[Tensor | None] = [None] * (L + 1)
        self.out_leaves: list[Tensor | None] = [None] * L
        self.embed_leaf: Tensor | None = None

        def detach(value, hook):
            return value.detach()

        def embed(value, hook):
            self.embed_leaf = value.detach().requires_grad_(True)
            return self.embed_leaf

        def capture(value, hook, layer):
            points[layer] = value
            return value

        def replace_mlp(value, hook, layer):
            leaf = value.detach().clone()
            skip = transcoders.transcoders[layer].to(value.dtype).skip(points[layer])
            if skip is not None:  # the skip term is linear: gradient flows through it, at a zeroed BOS
                leaf = leaf - skip.detach()  # too (circuit-tracer's `_configure_skip_connection`)
            leaf.requires_grad_(True)
            self.out_leaves[layer] = leaf
            # `0 * x` keeps the transcoder input in the graph so its target gradient is accepted
            return leaf + (points[layer] * 0 if skip is None else skip)

        hooks = [(name, detach) for name in model.hook_dict if is_frozen(name)]
        hooks.append(("hook_embed", embed))
        for layer in range(L):
            hooks.append((transcoders.hook_in(layer), partial(capture, layer=layer)))
            hooks.append((transcoders.hook_out(layer), partial(replace_mlp, layer=layer)))
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            resid = model(state.tokens[None].expand(B, -1), stop_at_layer=L)
            points[L] = model.ln_final(resid)
        self.points = points

    def rows(self, layers: Tensor, positions: Tensor, vectors: Tensor) -> Tensor:
        n = len(layers)
        if n > self.batch_size:
            raise ValueError(f"{n} targets in one pass of batch size {self.batch_size}")
        outputs, grads = [], []
        for layer in layers.unique().tolist():
            mask = layers == layer
            g = torch.zeros_like(self.points[layer])
            g[torch.arange(n)[mask], positions[mask]] = vectors[mask].to(g.dtype)
            outputs.append(self.points[layer])
            grads.append(g)
        inputs = [self.embed_leaf, *self.out_leaves]
        with torch.enable_grad():
            got = torch.autograd.grad(outputs, inputs, grad_outputs=grads, retain_graph=True, allow_unused=True)
        state, L, P = self.state, self.state.n_layers, self.state.n_pos
        out = torch.zeros(n, self.n_sources, dtype=self.points[0].dtype)
        n_feat = len(self.feature_index)
        for layer in range(L):
            g = got[layer + 1]
            if g is None:
                continue
            g = g[:n]
            # one matmul per position block (g[:, pos] for every feature would copy d_model floats per
            # feature and target: the largest cost of a pass at thousands of active features)
            for p, start, end in self.blocks[layer]:
                out[:, start:end] = g[:, p] @ self.decoder_vectors[start:end].T
            out[:, n_feat + layer * P: n_feat + (layer + 1) * P] = torch.einsum("bpd,pd->bp", g, state.errors[layer])
        if got[0] is not None:
            tok = n_feat + L * P
            out[:, tok: tok + P] = torch.einsum("bpd,pd->bp", got[0][:n], state.token_vectors)
        return out


def partial_influence(feature_weights: Tensor, row_nodes: Tensor, logit_probabilities: Tensor,
                      max_iter: int = 128) -> Tensor:
    """Influence on the logits of every active feature, from the adjacency rows computed so far;
    circuit-tracer's `compute_partial_influences` restricted to what the ranking reads.

    ``feature_weights[i] = |row_i[features]| / sum |row_i|`` (the row-normalised absolute adjacency's
    feature columns; row ``i`` is node ``row_nodes[i]``'s, the first ``K`` rows the logits'). Error
    and token nodes have no rows, so they pass no influence on and are not ranked: dropping their
    columns changes no feature's score. Kept row by row as the rows arrive (`attribute_prompt`),
    so no update copies the whole rows matrix.
    """
    K = len(logit_probabilities)
    total = torch.zeros(feature_weights.shape[1], dtype=feature_weights.dtype)
    weights = torch.zeros(len(row_nodes), dtype=feature_weights.dtype)
    weights[:K] = logit_probabilities.to(feature_weights.dtype)
    feature_rows = row_nodes[K:]
    for _ in range(max_iter):
        prod = weights @ feature_weights
        if not prod.any():
            return total
        total += prod
        weights = torch.cat([torch.zeros(K, dtype=prod.dtype), prod[feature_rows]])
    raise RuntimeError("influence did not converge: the graph has a cycle")


def attribute_prompt(model, transcoders: TranscoderSet, tokens: Tensor | Sequence[int], *, max_n_logits: int = 10,
                     desired_logit_prob: float = 0.95, batch_size: int = 64, max_feature_nodes: int | None = None,
                     update_interval: int = 4, zero_bos: bool = True, bos_token_id: int | None = None,
                     max_tokens: int | None = None, include_logits: Sequence[int] = (),
                     progress: bool = False) -> AttributionGraph:
    """The unpruned attribution graph of ``tokens`` (see the module docstring)."""
    if batch_size < 1:
        raise ConfigError(f"graph.batch_size = {batch_size}: must be >= 1")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ConfigError(f"graph.max_feature_nodes = {max_feature_nodes}: must be >= 0 (null: every active feature)")
    state = setup_prompt(model, transcoders, torch.as_tensor(tokens), zero_bos=zero_bos,
                         bos_token_id=bos_token_id, max_tokens=max_tokens)
    L, P = state.n_layers, state.n_pos
    with _no_parameter_grads(model):
        engine = BackwardEngine(model, transcoders, state, batch_size)
        index, values = engine.feature_index, state.active_features()[1]
        n_active = len(index)
        logit_idx, logit_p, logit_vecs = salient_logits(state.logits[-1], model.W_U, max_n_logits=max_n_logits,
                                                        desired_logit_prob=desired_logit_prob, include=include_logits)
        K = len(logit_idx)
        logit_offset = n_active + (L + 1) * P
        n_nodes = logit_offset + K
        budget = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
        rows = torch.zeros(budget + K, n_nodes, dtype=engine.points[0].dtype)
        row_nodes = torch.zeros(budget + K, dtype=torch.long)
        feature_weights = torch.zeros(budget + K, n_active, dtype=rows.dtype)  # see partial_influence

        def store(at: int, new_rows: Tensor) -> None:
            rows[at:at + len(new_rows), :logit_offset] = new_rows
            total = new_rows.abs().sum(dim=1, keepdim=True).clamp(min=1e-8)
            feature_weights[at:at + len(new_rows)] = new_rows[:, :n_active].abs() / total

        for i in range(0, K, batch_size):
            k = min(batch_size, K - i)
            store(i, engine.rows(torch.full((k,), L), torch.full((k,), P - 1), logit_vecs[i:i + k]))
            row_nodes[i:i + k] = torch.arange(i, i + k) + logit_offset
        encoder_rows = torch.cat([transcoders.transcoders[layer].W_enc.to(rows.dtype)[:, index[start:end, 2]].T
                                  for layer, (start, end) in enumerate(engine.spans)]) if n_active else None
        visited = torch.zeros(n_active, dtype=torch.bool)
        st, n_visited = K, 0
        with tqdm(total=budget, desc="graph rows", disable=not progress) as bar:
            while n_visited < budget:
                if budget == n_active:
                    pending = torch.arange(n_active)
                else:
                    scores = partial_influence(feature_weights[:st], row_nodes[:st], logit_p)
                    rank = torch.argsort(scores, descending=True, stable=True)
                    pending = rank[~visited[rank]][:min(update_interval * batch_size, budget - n_visited)]
                # by layer: a pass whose targets all sit at or below layer l runs backward from l only
                pending = pending[torch.argsort(index[pending, 0], stable=True)]
                for batch in pending.split(batch_size):
                    k = len(batch)
                    store(st, engine.rows(index[batch, 0], index[batch, 1], encoder_rows[batch]))
                    row_nodes[st:st + k] = batch
                    visited[batch] = True
                    st += k
                    n_visited += k
                    bar.update(k)
    selected = torch.where(visited)[0]
    columns = torch.cat([selected, torch.arange(n_active, n_nodes)])
    rows = rows[:, columns]
    order = row_nodes.argsort()
    rows = rows[order]
    m = len(selected)
    N = m + (L + 1) * P + K
    adjacency = torch.zeros(N, N, dtype=rows.dtype)
    adjacency[:m] = rows[:m]
    adjacency[N - K:] = rows[m:]
    return AttributionGraph(tokens=state.tokens, logit_tokens=logit_idx, logit_probabilities=logit_p,
                            active_features=index, activation_values=values, selected_features=selected,
                            adjacency=adjacency, n_layers=L)
