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
cached-activation approximation. Models whose head outputs are normalised after summation
(Gemma-2/3 ``use_normalization_before_and_after``) have no additive per-head sender and are refused.

The model's config flags are switched only inside `edge_mode` and restored afterwards (the model
object is shared between callers).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError

ReceiverHook = Callable[[int, str, Tensor], None]


def check_edge_model(model) -> None:
    """Raise `ConfigError` when the model's heads do not write additively into the residual."""
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
    if problems:
        raise ConfigError(
            f"edge-level circuits are not defined for model {cfg.model_name!r} (set model.edge_circuits: false): " + "; ".join(problems)
            + ". Use node-level patching (mechflow.attribution.patching) for this model.")


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
            register gradient hooks.

    Returns:
        (logits ``[b, pos, vocab]``, recorded sender outputs or None).
    """
    check_edge_model(model)
    graph = graph or EdgeGraph.from_cfg(model.cfg)
    H = graph.n_heads
    if removed is not None:
        if corrupted is None:
            raise ValueError("graph_forward: `removed` needs `corrupted` sender outputs")
        removed = removed & graph.valid
    with edge_mode(model):
        x, _, _, attention_mask = model.input_to_embed(tokens)
        if input_embed is not None:
            x = input_embed
        b, p, d = x.shape
        need_buf = record or removed is not None
        buf = torch.empty(graph.n_senders, b, p, d, dtype=x.dtype) if need_buf else None
        diff = torch.empty_like(buf) if removed is not None else None

        def emit(i0: int, out: Tensor) -> None:
            """Store sender outputs ``out`` ([k, b, p, d]) at sender indices i0..i0+k."""
            with torch.no_grad():
                if buf is not None:
                    buf[i0:i0 + out.shape[0]] = out
                if diff is not None:
                    diff[i0:i0 + out.shape[0]] = corrupted[i0:i0 + out.shape[0]] - out

        emit(0, x.unsqueeze(0))
        for L, block in enumerate(model.blocks):
            n_prev = graph.first_sender(L)
            r0 = graph.first_receiver(L)
            corr = _patch(diff, removed, n_prev, slice(r0, r0 + 3 * H))
            qkv_in = x.unsqueeze(2).expand(b, p, 3 * H, d)
            if corr is not None:
                qkv_in = qkv_in + corr
            if on_receiver is not None:
                on_receiver(L, "qkv", qkv_in)
            normed = block.ln1(qkv_in)
            z_box: list[Tensor] = []
            handle = block.attn.hook_z.register_forward_hook(lambda m, i, o: z_box.append(o))
            try:
                attn_out = block.attn(
                    query_input=normed[:, :, :H], key_input=normed[:, :, H:2 * H],
                    value_input=normed[:, :, 2 * H:], attention_mask=attention_mask)
            finally:
                handle.remove()
            if need_buf:
                heads = torch.einsum("bphe,hed->hbpd", z_box[0], block.attn.W_O)
                emit(n_prev, heads)
            x = x + attn_out
            corr = _patch(diff, removed, n_prev + H, graph.mlp_receiver(L))
            mlp_in = x if corr is None else x + corr
            if on_receiver is not None:
                mlp_in = mlp_in.clone() if corr is None else mlp_in  # own node: grads via MLP only
                on_receiver(L, "mlp", mlp_in)
            mlp_out = block.mlp(block.ln2(mlp_in))
            emit(n_prev + H, mlp_out.unsqueeze(0))
            x = x + mlp_out
        corr = _patch(diff, removed, graph.n_senders, graph.logits_receiver)
        final = x if corr is None else x + corr
        if on_receiver is not None:
            final = final.clone() if corr is None else final
            on_receiver(graph.n_layers, "logits", final)
        if model.cfg.normalization_type is not None:
            final = model.ln_final(final)
        logits = model.unembed(final)
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
    return logits, buf
