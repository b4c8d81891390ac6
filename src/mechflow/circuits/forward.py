"""Edge-level forward pass: every receiver reads its own copy of the residual stream.

Steps (edge patching as in Conmy et al. 2023 ACDC and Hanna et al. 2024 EAP-IG; graph of MIB):

1. The embedding (sender ``input``) starts the residual stream ``x``.
2. Per layer L: the q, k and v inputs of every head are ``x`` plus, for every removed edge
   s -> receiver, ``corrupted_s - current_s`` (the sender's corrupted output minus its output in
   THIS forward). The norm ``ln1`` is applied per receiver (it belongs to the receiver). K and V are
   computed per QUERY head (the KV weights of its group), so each query head has its own k and v
   receiver; with nothing patched this is the model's own function.
3. The per-head outputs ``z_h W_O[h]`` are the head senders; the MLP input is ``x + attn_out`` plus
   the removed-edge corrections; the MLP output is the MLP sender.
4. The logits read ``x`` (after the last block) plus corrections, then ``ln_final`` and unembed.

Everything downstream of a patched edge is recomputed: this is exact circuit evaluation, not a
cached-activation approximation.

Fast path (``fast=True``, the default without ``on_receiver``; same function, less work):

* a receiver's correction is the sum over its removed edges or, when it keeps fewer edges than it
  removes, ``D_L - sum over kept edges`` with ``D_L`` the sum of all ``corrupted_s - current_s``
  so far (a running sum); sparse circuits then cost as little as dense ones;
* receivers with the same correction share one input and one norm (fully removed receivers all
  read the same ``x + D_L``);
* K and V are computed once per distinct (input, KV group) pair, not per query head: a GQA group
  whose query heads' k (or v) inputs are equal costs one projection, as in the model itself;
* the sender-by-receiver product reads only the sender rows it needs (it is memory-bound: the
  ``[n_senders, b*pos*d]`` difference does not fit in cache), copied into one reused buffer.

``fast=False`` keeps the direct form (every receiver its own input, sum over removed edges,
TransformerLens' per-query-head K/V); tests check that both agree. The unembedding reads ``W_U``
in place and, with ``logit_positions``, only the positions the metric needs.

Models whose head outputs are normalised after summation (Gemma-2/3
``use_normalization_before_and_after``) have no additive per-head sender and are refused; their
circuits are node circuits (`mechflow.circuits.nodes`).

The model's config flags are switched only inside `edge_mode` and restored afterwards (the model
object is shared between callers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError

ReceiverHook = Callable[[int, str, Tensor], None]


def edge_model_problems(model) -> list[str]:
    """Why edge patching is not defined for ``model`` (empty when it is)."""
    cfg = model.cfg
    problems = []
    if getattr(cfg, "use_normalization_before_and_after", False):
        problems.append("a norm is applied to the attention/MLP output before it joins the residual "
                        "(Gemma-style post-norms), so a single head's output is not an additive sender")
    if getattr(cfg, "parallel_attn_mlp", False):
        problems.append("attention and MLP run in parallel")
    if getattr(cfg, "attn_only", False):
        problems.append("attention-only models have no MLP nodes")
    if cfg.positional_embedding_type == "shortformer":
        problems.append("shortformer position embeddings are added inside attention")
    return problems


def check_edge_model(model) -> None:
    """Raise `ConfigError` when the model's heads do not write additively into the residual."""
    problems = edge_model_problems(model)
    if problems:
        raise ConfigError(
            f"edge-level circuits are not defined for model {model.cfg.model_name!r} (set model.edge_circuits: "
            "false): " + "; ".join(problems) + ". Use node-level circuits (circuits.unit: nodes or auto; "
            "mechflow.circuits.nodes) or node-level patching (mechflow.attribution.patching) for this model.")


@contextlib.contextmanager
def tl_flags(model, **flags) -> Iterator[None]:
    """Set config flags on the model and every submodule's cfg; restore them afterwards."""
    cfgs = {id(m.cfg): m.cfg for m in model.modules() if hasattr(m, "cfg")}
    cfgs[id(model.cfg)] = model.cfg
    saved = [(c, k, getattr(c, k)) for c in cfgs.values() for k in flags]
    try:
        for c in cfgs.values():
            for k, v in flags.items():
                setattr(c, k, v)
        yield
    finally:
        for c, k, v in saved:
            setattr(c, k, v)


@contextlib.contextmanager
def edge_mode(model) -> Iterator[None]:
    """Per-head q/k/v inputs, per-query-head K/V weights; restore every cfg object afterwards."""
    with tl_flags(model, use_split_qkv_input=True, ungroup_grouped_query_attention=True, use_attn_result=False):
        yield



def _patch(diff: Tensor | None, removed: Tensor | None, n_prev: int, cols: slice | int) -> Tensor | None:
    """Sum over removed edges of (corrupted - current) sender outputs for a group of receivers.

    Returns ``[b, pos, R, d]`` for a slice of receivers, ``[b, pos, d]`` for one, or None.
    """
    if removed is None:
        return None
    w = removed[:n_prev, cols]
    rows = w.reshape(n_prev, -1).any(1).nonzero().flatten()
    if rows.numel() == 0:
        return None
    w = w[rows].to(diff.dtype)
    src = diff[rows] if rows.numel() < n_prev else diff[:n_prev]
    b, p, d = src.shape[1:]
    flat = src.reshape(src.shape[0], -1)
    if w.ndim == 1:
        return (w @ flat).reshape(b, p, d)
    return (w.T @ flat).reshape(w.shape[1], b, p, d).permute(1, 2, 0, 3)


def graph_forward(
    model,
    tokens: Tensor,
    graph: EdgeGraph | None = None,
    *,
    input_embed: Tensor | None = None,
    corrupted: Tensor | None = None,
    removed: Tensor | None = None,
    record: bool = False,
    on_receiver: ReceiverHook | None = None,
    fast: bool = True,
    logit_positions: slice | None = None,
    grad_from_layer: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Run the model through the edge graph.

    Args:
        model: TransformerLens HookedTransformer (llama/GPT-2-like, pre-norm, sequential blocks).
        tokens: ``[b, pos]``.
        graph: defaults to ``EdgeGraph.from_cfg(model.cfg)``.
        input_embed: replaces the embedding sender's output ``[b, pos, d]`` (EAP-IG interpolation).
        corrupted: ``[n_senders, b, pos, d]`` sender outputs of the corrupted run (with ``removed``).
        removed: ``[n_senders, n_receivers]`` bool, edges to patch; None = plain forward.
        record: also return every sender's output ``[n_senders, b, pos, d]``.
        on_receiver: called as ``f(layer, kind, tensor)`` with each receiver-input tensor
            (``kind`` ``"qkv"`` ``[b, pos, 3H, d]`` ordered q-heads, k-heads, v-heads; ``"mlp"``
            ``[b, pos, d]``; ``"logits"`` ``[b, pos, d]``, layer = n_layers) before its norm, e.g. to
            register gradient hooks. Forces the direct path (each receiver needs its own tensor).
        fast: use the fast path (see module docstring); ``False`` computes every receiver directly.
        logit_positions: unembed only these positions (e.g. ``slice(-1, None)`` when the metric
            reads the last position): the vocabulary projection is the largest single product.
        grad_from_layer: layers below it run under ``torch.no_grad()`` and report no receivers;
            the residual entering it is detached into a new leaf that requires grad, reported as
            ``on_receiver(grad_from_layer, "residual", leaf)`` (differentiate w.r.t. it). For
            gradients that are only needed at receivers of later layers: the backward then stops
            there instead of running through the whole model.

    Returns:
        (logits ``[b, pos, vocab]`` (``pos`` restricted by ``logit_positions``), recorded sender
        outputs or None).
    """
    check_edge_model(model)
    graph = graph or EdgeGraph.from_cfg(model.cfg)
    if removed is not None:
        if corrupted is None:
            raise ValueError("graph_forward: `removed` needs `corrupted` sender outputs")
        removed = removed & graph.valid
    with edge_mode(model):
        x, _, _, attention_mask = model.input_to_embed(tokens)
        if input_embed is not None:
            x = input_embed
        if not 0 <= grad_from_layer < graph.n_layers:
            raise ValueError(f"graph_forward: grad_from_layer {grad_from_layer} is not a layer of the model")
        run = _Run(model, graph, x, corrupted, removed, record)
        layer = _fast_layer if fast and on_receiver is None else _direct_layer
        for L, block in enumerate(model.blocks):
            if L < grad_from_layer:
                with torch.no_grad():
                    run.x = layer(run, L, block, attention_mask, None)
                continue
            if L == grad_from_layer > 0:
                run.x = run.x.detach().requires_grad_(torch.is_grad_enabled())
                if on_receiver is not None:
                    on_receiver(L, "residual", run.x)
            run.x = layer(run, L, block, attention_mask, on_receiver)
        final, patched = run.receiver_input(graph.logits_receiver, graph.n_senders, fast)
        if on_receiver is not None:
            final = final if patched else final.clone()
            on_receiver(graph.n_layers, "logits", final)
        if model.cfg.normalization_type is not None:
            final = model.ln_final(final)
        if logit_positions is not None:
            final = final[:, logit_positions]
        # W_U read in place (TransformerLens' Unembed copies the [d_model, vocab] matrix every call)
        W_U = model.unembed.W_U
        logits = (final.reshape(-1, W_U.shape[0]) @ W_U + model.unembed.b_U).reshape(*final.shape[:-1], -1)
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
    return logits, run.buf


class _Run:
    """State of one edge-level forward: residual ``x``, recorded outputs, sender differences."""

    def __init__(self, model, graph: EdgeGraph, x: Tensor, corrupted: Tensor | None, removed: Tensor | None,
                 record: bool):
        self.model, self.graph, self.x, self.corrupted, self.removed = model, graph, x, corrupted, removed
        n, (b, p, d) = graph.n_senders, x.shape
        self.buf = torch.empty(n, b, p, d, dtype=x.dtype) if record else None
        self.diff = torch.empty(n, b, p, d, dtype=x.dtype) if removed is not None else None
        self.dsum = torch.zeros_like(x) if removed is not None else None  # sum of diff rows emitted
        self.scratch: Tensor | None = None
        self.emit(0, x.unsqueeze(0))

    @property
    def need_senders(self) -> bool:
        return self.buf is not None or self.diff is not None

    def emit(self, i0: int, out: Tensor) -> None:
        """Store sender outputs ``out`` ([k, b, p, d]) at sender indices i0..i0+k."""
        with torch.no_grad():
            i1 = i0 + out.shape[0]
            if self.buf is not None:
                self.buf[i0:i1] = out
            if self.diff is not None:
                torch.sub(self.corrupted[i0:i1], out, out=self.diff[i0:i1])
                self.dsum += self.diff[i0:i1].sum(0)

    def receiver_input(self, receiver: int, n_prev: int, fast: bool) -> tuple[Tensor, bool]:
        """Input ``[b, pos, d]`` of one receiver (MLP input, logits) and whether it is patched."""
        if self.removed is None:
            return self.x, False
        if not fast:
            corr = _patch(self.diff, self.removed, n_prev, receiver)
            return (self.x, False) if corr is None else (self.x + corr, True)
        plan = _plan(self.removed[:n_prev, receiver:receiver + 1], self.x.dtype)
        if plan.is_identity:
            return self.x, False
        return self.unique_inputs(plan)[0], True

    def unique_inputs(self, plan: _Plan) -> Tensor:
        """``[U, b, pos, d]``: x plus the correction of each distinct receiver column of ``plan``."""
        U = plan.flag.numel()
        out = self.x.unsqueeze(0).repeat(U, 1, 1, 1)
        if plan.nz.numel():
            flat = self.diff.reshape(self.diff.shape[0], -1)
            n = plan.rows.numel()
            if n == int(plan.rows[-1]) + 1:  # a prefix of the senders: no copy
                src = flat[:n]
            else:  # the product is memory-bound: read only the rows it needs (a reused buffer)
                if self.scratch is None:
                    self.scratch = torch.empty_like(flat)
                src = torch.index_select(flat, 0, plan.rows, out=self.scratch[:n])
            out.index_add_(0, plan.nz, (plan.weight.T @ src).reshape(-1, *self.x.shape))
        if plan.flagged.numel():
            out.index_add_(0, plan.flagged, self.dsum.expand(plan.flagged.numel(), *self.x.shape))
        return out


@dataclass(frozen=True)
class _Plan:
    """Distinct corrections of a block of receivers (columns of ``removed[:n_prev, cols]``).

    Column j of the block reads unique input ``inverse[j]``; unique input u is
    ``x + weight[:, nz == u]^T diff[rows] + flag[u] D`` (``weight`` signed).
    """

    inverse: Tensor  # [R] long
    flag: Tensor  # [U] bool: adds D (kept-edge form)
    flagged: Tensor  # indices of flag
    nz: Tensor  # [U'] unique columns with a non-zero weight column
    rows: Tensor  # [n_rows] senders with a non-zero weight, ascending
    weight: Tensor  # [n_rows, U'] float, entries in {-1, 0, 1}

    @property
    def is_identity(self) -> bool:
        return self.nz.numel() == 0 and self.flagged.numel() == 0


def _plan(block: Tensor, dtype: torch.dtype) -> _Plan:
    """Choose per receiver the cheaper form (removed edges, or D minus kept edges) and deduplicate."""
    n_prev = block.shape[0]
    n_removed = block.sum(0)
    kept_form = 2 * n_removed > n_prev
    w = torch.where(kept_form, -(~block).to(torch.int8), block.to(torch.int8))  # [n_prev, R]
    sig = torch.cat([kept_form.to(torch.int8)[None], w]).T  # [R, 1 + n_prev]
    uniq, inverse = torch.unique(sig, dim=0, return_inverse=True)
    flag = uniq[:, 0].bool()
    wu = uniq[:, 1:].T  # [n_prev, U]
    nz = wu.any(0).nonzero().flatten()
    rows = wu[:, nz].any(1).nonzero().flatten()
    return _Plan(inverse, flag, flag.nonzero().flatten(), nz, rows, wu[rows][:, nz].to(dtype))


def _attend(run: _Run, block, n_prev: int, **inputs) -> Tensor:
    """``block.attn(**inputs)``; records each head's output ``z_h W_O^h`` as a sender when needed."""
    z_box: list[Tensor] = []
    handle = block.attn.hook_z.register_forward_hook(lambda m, i, o: z_box.append(o))
    try:
        attn_out = block.attn(**inputs)
    finally:
        handle.remove()
    if run.need_senders:
        run.emit(n_prev, torch.einsum("bphe,hed->hbpd", z_box[0], block.attn.W_O))
    return attn_out


def _fast_layer(run: _Run, L: int, block, attention_mask, on_receiver) -> Tensor:
    g, x, H = run.graph, run.x, run.graph.n_heads
    n_prev, r0 = g.first_sender(L), g.first_receiver(L)
    if run.removed is None:
        inverse = torch.zeros(3 * H, dtype=torch.long)
        normed = block.ln1(x).unsqueeze(2)  # [b, pos, 1, d]: every receiver reads x
    else:
        plan = _plan(run.removed[:n_prev, r0:r0 + 3 * H], x.dtype)
        inverse = plan.inverse
        normed = block.ln1(run.unique_inputs(plan).permute(1, 2, 0, 3))  # [b, pos, U, d]
    with _shared_kv(block.attn, inverse[:H], inverse[H:2 * H], inverse[2 * H:]):
        attn_out = _attend(run, block, n_prev, query_input=normed, key_input=normed, value_input=normed,
                           attention_mask=attention_mask)
    x = x + attn_out
    run.x = x
    mlp_out = block.mlp(block.ln2(run.receiver_input(g.mlp_receiver(L), n_prev + H, True)[0]))
    run.emit(n_prev + H, mlp_out.unsqueeze(0))
    return x + mlp_out


def _direct_layer(run: _Run, L: int, block, attention_mask, on_receiver) -> Tensor:
    g, x, H = run.graph, run.x, run.graph.n_heads
    b, p, d = x.shape
    n_prev, r0 = g.first_sender(L), g.first_receiver(L)
    corr = _patch(run.diff, run.removed, n_prev, slice(r0, r0 + 3 * H))
    qkv_in = x.unsqueeze(2).expand(b, p, 3 * H, d)
    if corr is not None:
        qkv_in = qkv_in + corr
    if on_receiver is not None:
        on_receiver(L, "qkv", qkv_in)
    normed = block.ln1(qkv_in)
    attn_out = _attend(run, block, n_prev, query_input=normed[:, :, :H], key_input=normed[:, :, H:2 * H],
                       value_input=normed[:, :, 2 * H:], attention_mask=attention_mask)
    x = x + attn_out
    run.x = x
    mlp_in, patched = run.receiver_input(g.mlp_receiver(L), n_prev + H, False)
    if on_receiver is not None:
        mlp_in = mlp_in if patched else mlp_in.clone()  # own node: grads via MLP only
        on_receiver(L, "mlp", mlp_in)
    mlp_out = block.mlp(block.ln2(mlp_in))
    run.emit(n_prev + H, mlp_out.unsqueeze(0))
    return x + mlp_out


@contextlib.contextmanager
def _shared_kv(attn, q_in: Tensor, k_in: Tensor, v_in: Tensor) -> Iterator[None]:
    """Make ``attn`` read per-head inputs from a stack of distinct inputs, K/V once per (input, group).

    Within the block, ``attn(query_input=u, key_input=u, value_input=u)`` with ``u`` ``[b, pos, U, d]``
    gives query head h the input ``u[:, :, q_in[h]]`` (likewise k, v). K (V) is projected once per
    distinct pair (input, KV group) and shared by the group's query heads, so a GQA group whose
    heads read the same k input costs one projection, as in the model itself. Only the
    projections are replaced (TransformerLens' ``calculate_qkv_matrices``, shadowed on the
    instance); rotary, masking, softmax and the output stay TransformerLens' own code.
    """
    H = attn.cfg.n_heads
    grouped = hasattr(attn, "_W_K")  # GroupedQueryAttention: _W_K [n_kv, d, d_head]
    group = torch.arange(H) // (attn.repeat_kv_heads if grouped else 1)

    def linear(u: Tensor, idx: Tensor, W: Tensor, b: Tensor) -> Tensor:
        """``[b, pos, len(idx), e]``: input ``u[:, :, idx[j]]`` times ``W[j]`` plus ``b[j]``."""
        if bool((idx == idx[0]).all()):  # one shared input: a single product
            return torch.einsum("bpd,jde->bpje", u[:, :, int(idx[0])], W) + b
        return torch.einsum("bpjd,jde->bpje", u.index_select(2, idx), W) + b

    def project(u: Tensor, idx: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        units, head_unit = torch.unique(torch.stack([idx, group], 1), dim=0, return_inverse=True)
        grp = units[:, 1]
        return linear(u, units[:, 0], W.index_select(0, grp), b.index_select(0, grp)), head_unit

    def qkv(u: Tensor, _k: Tensor, _v: Tensor):
        q = attn.hook_q(linear(u, q_in, attn.W_Q, attn.b_Q))
        W_K, b_K, W_V, b_V = ((attn._W_K, attn._b_K, attn._W_V, attn._b_V) if grouped
                              else (attn.W_K, attn.b_K, attn.W_V, attn.b_V))
        k, k_of = project(u, k_in, W_K, b_K)
        v, v_of = project(u, v_in, W_V, b_V)
        if attn.cfg.use_qk_norm:
            q = attn._apply_qk_norm(q, attn.q_norm)
            k = attn._apply_qk_norm(k, attn.k_norm)
        return q, attn.hook_k(k.index_select(2, k_of)), attn.hook_v(v.index_select(2, v_of))

    attn.calculate_qkv_matrices = qkv  # instance attribute shadows the method
    try:
        yield
    finally:
        del attn.calculate_qkv_matrices
