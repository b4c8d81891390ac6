"""Edge-patched forward that starts mid-model from a cached clean state (ACDC's inner loop).

Adapter to `mechflow.circuits.forward`: same graph, same edge semantics (a removed edge s -> r adds
``corrupted_s - current_s`` to r's input BEFORE r's norm; the norm belongs to the receiver; K/V
per query head), same model flags (`edge_mode`). Differences, all for speed, none changing a value
beyond float round-off (tested against `graph_forward` in ``tests/unit/benchmark``):

1. Stages: ``2L`` = attention of layer L, ``2L+1`` = MLP of layer L, ``2 n_layers`` = logits. When
   every removed edge ends at a receiver of stage ``>= t``, everything before stage ``t`` is the
   CLEAN run; so the clean residual at each stage and the clean sender outputs are cached once and
   a run starts at stage ``t`` (ACDC visits receivers in reverse topological order, so this holds
   for every candidate it evaluates).
2. Only the final position's output is computed after the last layer's attention (the metrics
   read nothing else): the last MLP and the unembedding run on one position per prompt.
3. Batched candidates: ``K`` copies of the prompts run side by side; copy ``k`` additionally
   removes the edges ``cand[k]`` into the current receiver ``cur`` (all from senders before the
   start stage). Removed edges into receivers of later stages are shared by all copies.
4. The patch sums of later stages over senders before the start stage do not change while ACDC
   works on receivers of one stage; they are cached per start stage (``StageCache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechflow.circuits.forward import check_edge_model, edge_mode, graph_forward
from mechflow.circuits.graph import EdgeGraph


@dataclass
class StageCache:
    """Patch sums over pre-start senders for stages after ``start`` (valid while the removed
    edges into those stages are unchanged, i.e. while ACDC works on receivers of ``start``)."""

    start: int = -1
    up: dict[int, Tensor | None] = field(default_factory=dict)

    def reset(self, start: int) -> None:
        if start != self.start:
            self.start, self.up = start, {}


class ResumableForward:
    """Cached clean state of one prompt batch; evaluates edge-patched circuits from any stage.

    Args:
        model: TransformerLens HookedTransformer (as `mechflow.circuits.forward.graph_forward`).
        graph: the edge graph.
        clean_tokens, corrupted_tokens: ``[n, pos]``.
    """

    def __init__(self, model, graph: EdgeGraph, clean_tokens: Tensor, corrupted_tokens: Tensor):
        check_edge_model(model)
        self.model, self.graph = model, graph
        self.n, self.pos = clean_tokens.shape
        with torch.no_grad():
            self.corrupted = graph_forward(model, corrupted_tokens, graph, record=True)[1]
            with edge_mode(model):
                x0, _, _, self.attention_mask = model.input_to_embed(clean_tokens)
            self.x: list[Tensor] = []
            self.clean = torch.empty_like(self.corrupted)
            self.clean[0] = x0  # the embedding sender
            self.clean_last_logits = self.run(0, x0, None, record=True)[0]
        self.diff = self.corrupted - self.clean  # [n_senders, n, pos, d]
        self.n_forward = 0
        # TL's Unembed transposes W_U into a contiguous copy on every call (113 MB for SmolLM2);
        # keep one copy so the result is the same F.linear without the per-call copy.
        self._w_u = model.unembed.W_U.detach().T.contiguous()

    # ------------------------------------------------------------------ stage bookkeeping
    @property
    def n_stages(self) -> int:
        return 2 * self.graph.n_layers + 1

    def stage_of(self, receiver: int) -> int:
        g = self.graph
        if receiver == g.logits_receiver:
            return 2 * g.n_layers
        L, j = divmod(receiver, 3 * g.n_heads + 1)
        return 2 * L + (1 if j == 3 * g.n_heads else 0)

    def n_up(self, stage: int) -> int:
        """Senders computed before ``stage`` (those a receiver of ``stage`` may read)."""
        g = self.graph
        if stage == 2 * g.n_layers:
            return g.n_senders
        L, is_mlp = divmod(stage, 2)
        return g.first_sender(L) + (g.n_heads if is_mlp else 0)

    def cols(self, stage: int) -> slice:
        g = self.graph
        if stage == 2 * g.n_layers:
            return slice(g.logits_receiver, g.logits_receiver + 1)
        L, is_mlp = divmod(stage, 2)
        if is_mlp:
            return slice(g.mlp_receiver(L), g.mlp_receiver(L) + 1)
        return slice(g.first_receiver(L), g.first_receiver(L) + 3 * g.n_heads)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, removed: Tensor, cur: int, cand: Tensor | None = None,
                 cache: StageCache | None = None) -> Tensor:
        """Final-position logits ``[K, n, vocab]`` of the circuit(s).

        Args:
            removed: bool ``[n_senders, n_receivers]`` removed edges shared by every copy; none may
                end before the stage of ``cur``.
            cur: the receiver whose candidate edges are tried (fixes the start stage).
            cand: float ``[K, n_senders]`` 0/1, copy k also removes ``s -> cur`` where
                ``cand[k, s] = 1``; None = one copy with nothing extra.
            cache: per-start-stage cache of patch sums (see `StageCache`).
        """
        stage = self.stage_of(cur)
        g = self.graph
        removed = removed & g.valid
        if removed[:, :self.cols(stage).start].any():
            raise ValueError("ResumableForward.evaluate: an edge before the start stage is removed")
        if cand is not None and (cand.bool() & removed[:, cur]).any():
            raise ValueError("ResumableForward.evaluate: a candidate edge is already removed")
        self.n_forward += 1
        return self.run(stage, self.x[stage], removed, cur=cur, cand=cand, cache=cache)

    def run(self, stage: int, x: Tensor, removed: Tensor | None, *, cur: int | None = None,
            cand: Tensor | None = None, cache: StageCache | None = None, record: bool = False) -> Tensor:
        """Run stages ``stage ..`` from residual ``x`` ``[n, pos, d]``; see `evaluate`."""
        g, model, H = self.graph, self.model, self.graph.n_heads
        n, p = self.n, self.pos
        K = 1 if cand is None else cand.shape[0]
        B = K * n
        n_up = self.n_up(stage)
        if cache is not None:
            cache.reset(stage)
        # Senders computed in this run that some removed edge reads: keep their per-copy diffs.
        down_rows: dict[int, int] = {}
        if removed is not None:
            for i in (removed[n_up:].any(1).nonzero().flatten() + n_up).tolist():
                down_rows[i] = len(down_rows)
        d = x.shape[-1]
        diff_down = x.new_empty(len(down_rows), B, p, d) if down_rows else None
        attn_mask = self.attention_mask
        if attn_mask is not None and K > 1:
            attn_mask = attn_mask.repeat(K, 1)

        def correction(t: int, last_only: bool = False) -> Tensor | None:
            """Patch sum for the receivers of stage t: ``[K or 1, n, p', R, d]`` or None."""
            if removed is None:
                return None
            cols, n_prev = self.cols(t), self.n_up(t)
            R, pp = cols.stop - cols.start, (1 if last_only else p)
            total = None
            # senders before the start stage: shared by the copies; cached for later stages
            if cache is not None and t != stage and t in cache.up:
                up = cache.up[t]
            else:
                up = _weighted(removed[:n_up, cols], self.diff[:n_up], last_only)
                if up is not None:
                    up = up.reshape(R, 1, n, pp, d)
                if cache is not None and t != stage:
                    cache.up[t] = up
            total = up
            # senders computed in this run (per copy)
            if diff_down is not None:
                rows = [s for s in range(n_up, n_prev) if s in down_rows]
                w = removed[rows, cols] if rows else None
                if w is not None and w.any():
                    src = diff_down[[down_rows[s] for s in rows]]
                    part = _weighted(w, src, last_only).reshape(R, K, n, pp, d)
                    total = part if total is None else total + part
            # the candidates, at column `cur` of the start stage
            if cand is not None and t == stage:
                cols_nz = cand.any(0).nonzero().flatten()
                src = self.diff[cols_nz]
                src = src[:, :, -1:] if last_only else src
                part = (cand[:, cols_nz].to(src.dtype) @ src.reshape(len(cols_nz), -1)).reshape(K, n, pp, d)
                full = torch.zeros(R, K, n, pp, d, dtype=src.dtype) if total is None else \
                    total.expand(R, K, n, pp, d).clone()
                full[cur - cols.start] += part
                total = full
            if total is None:
                return None
            return total.permute(1, 2, 3, 0, 4)  # [K or 1, n, p', R, d]

        def emit(s: int, out: Tensor) -> None:
            """Record sender ``s``'s output ``[B, p, d]`` (clean pass) or its per-copy diff."""
            if record:
                self.clean[s] = out
            if s in down_rows:  # out may hold only the last position (last MLP)
                pp = out.shape[1]
                diff_down[down_rows[s], :, p - pp:] = (self.corrupted[s, :, p - pp:].unsqueeze(0)
                                                       - out.reshape(K, n, pp, d)).reshape(B, pp, d)

        if K > 1:
            x = x.repeat(K, 1, 1)
        with edge_mode(model):
            for t in range(stage, 2 * g.n_layers):
                L, is_mlp = divmod(t, 2)
                block = model.blocks[L]
                if record:
                    self.x.append(x)
                corr = correction(t) if not (is_mlp and L == g.n_layers - 1 and not record) else None
                if not is_mlp:
                    qkv_in = x.unsqueeze(2).expand(B, p, 3 * H, d)
                    if corr is not None:
                        qkv_in = (qkv_in.view(K, n, p, 3 * H, d) + corr).reshape(B, p, 3 * H, d)
                    normed = block.ln1(qkv_in)
                    z_box: list[Tensor] = []
                    handle = block.attn.hook_z.register_forward_hook(lambda m, i, o, box=z_box: box.append(o))
                    try:
                        attn_out = block.attn(query_input=normed[:, :, :H], key_input=normed[:, :, H:2 * H],
                                              value_input=normed[:, :, 2 * H:], attention_mask=attn_mask)
                    finally:
                        handle.remove()
                    s0 = g.first_sender(L)
                    for h in range(H):
                        if record or s0 + h in down_rows:
                            emit(s0 + h, z_box[0][:, :, h] @ block.attn.W_O[h])
                    x = x + attn_out
                else:
                    last = L == g.n_layers - 1 and not record
                    if last:  # nothing after the last MLP reads another position
                        x, corr = x[:, -1:], correction(t, last_only=True)
                    pp = x.shape[1]
                    mlp_in = x if corr is None else (x.view(K, n, pp, d) + corr[..., 0, :]).reshape(B, pp, d)
                    mlp_out = block.mlp(block.ln2(mlp_in))
                    emit(g.mlp_sender(L), mlp_out)
                    x = x + mlp_out
            if record:
                self.x.append(x)
            corr = correction(2 * g.n_layers, last_only=True)
            final = x[:, -1:]
            if corr is not None:
                final = (final.reshape(K, n, 1, d) + corr[..., 0, :]).reshape(B, 1, d)
            if model.cfg.normalization_type is not None:
                final = model.ln_final(final)
            w_u = getattr(self, "_w_u", None)
            logits = (model.unembed(final) if w_u is None else
                      torch.nn.functional.linear(final, w_u, model.unembed.b_U))[:, 0]
            cap = getattr(model.cfg, "output_logits_soft_cap", None)
            if cap is not None and cap > 0:
                logits = cap * torch.tanh(logits / cap)
        return logits.view(K, n, -1)


def _weighted(w: Tensor, src: Tensor, last_only: bool) -> Tensor | None:
    """``sum_s w[s, r] src[s]`` over rows with any weight: ``[R, *src.shape[1:]]`` flattened, or None."""
    rows = w.any(1).nonzero().flatten()
    if rows.numel() == 0:
        return None
    src = src[rows]
    if last_only:
        src = src[:, :, -1:]
    return w[rows].to(src.dtype).T @ src.reshape(rows.numel(), -1)
