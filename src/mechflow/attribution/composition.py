"""Q-, K- and V-composition scores between attention heads.

Definitions (Elhage et al. 2021, "A mathematical framework for transformer circuits"; row-vector
convention of TransformerLens, ``x @ W``):

1. Per head, ``W_OV = W_V W_O`` ``[d_model, d_model]`` (what the head writes for what it reads) and
   ``W_QK = W_Q W_K^T`` (its bilinear attention score). GQA: every query head uses the key/value
   weights of its KV group (TransformerLens' ``W_K``/``W_V`` already repeat them per query head).
2. For an earlier head A (layer l_A) and a later head B (l_B > l_A):
   Q-composition ``||W_OV^A W_QK^B||_F``, K-composition ``||W_QK^B W_OV^A^T||_F`` (equal to
   TransformerLens' ``||W_OV^A (W_QK^B)^T||_F``), V-composition ``||W_OV^A W_OV^B||_F``, each
   divided by ``||W_OV^A||_F ||W_right^B||_F``. Pairs with ``l_B <= l_A`` are 0. No baseline
   (random-matrix expectation) is subtracted.
3. Norm weights (``include_norm_weights=True``): the diagonal weights the matrices really pass
   through are folded in: the reading head's ``ln1.w`` on both sides of ``W_QK`` and in front of
   ``W_OV`` (absent after mechflow's fold_ln, where they are already inside W_Q/W_K/W_V), Gemma's
   per-head ``q_norm.w``/``k_norm.w`` between ``W_Q``/``W_K`` and the score, and Gemma's
   ``ln1_post.w`` after ``W_O``. The norms' data-dependent scales and the rotary rotation are
   not weights and are left out, as in the paper (scores are scale invariant per head anyway).
4. Computation without forming ``d_model x d_model`` products: with ``W_left = A_1 B_1``
   (``[d, r] [r, d]``) and ``W_right = A_2 B_2``, ``||W_left W_right||_F^2 = sum((G M) * (M H))``
   where ``M = B_1 A_2``, ``G = A_1^T A_1``, ``H = B_2 B_2^T`` (all ``r x r``, ``r = d_head``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from mechflow.attribution.lens import scores_frame
from mechflow.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("Q", "K", "V")


def _diag_w(norm) -> Tensor | None:
    return getattr(norm, "w", None) if norm is not None else None


def head_factors(model, include_norm_weights: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """Low-rank factors ``(A [L, H, d, r], B [L, H, r, d])`` of every head's ``OV`` and ``QK``.

    ``OV = (w_ln1 * W_V) (W_O * w_ln1_post)`` and ``QK = (w_ln1 * W_Q * w_q) (w_ln1 * W_K * w_k)^T``
    where each ``w`` is a norm's diagonal weight, present only with ``include_norm_weights`` and
    only when the model has it (step 3 of the module docstring).
    """
    ov_a, ov_b, qk_a, qk_b = [], [], [], []
    for block in model.blocks:
        attn = block.attn
        W_Q, W_K, W_V, W_O = attn.W_Q, attn.W_K, attn.W_V, attn.W_O  # [H, d, r] x3, [H, r, d]
        if include_norm_weights:
            w_in = _diag_w(getattr(block, "ln1", None))
            if w_in is not None:
                W_Q, W_K, W_V = (w_in[:, None] * W for W in (W_Q, W_K, W_V))
            wq, wk = _diag_w(getattr(attn, "q_norm", None)), _diag_w(getattr(attn, "k_norm", None))
            W_Q = W_Q * wq if wq is not None else W_Q
            W_K = W_K * wk if wk is not None else W_K
            w_post = _diag_w(getattr(block, "ln1_post", None))
            W_O = W_O * w_post if w_post is not None else W_O
        ov_a.append(W_V)
        ov_b.append(W_O)
        qk_a.append(W_Q)
        qk_b.append(W_K.transpose(-1, -2))
    stack = torch.stack
    return {"OV": (stack(ov_a), stack(ov_b)), "QK": (stack(qk_a), stack(qk_b))}


def dense_matrices(model, include_norm_weights: bool = True) -> dict[str, Tensor]:
    """``[L, H, d, d]`` dense ``OV`` and ``QK`` (small models / tests only)."""
    return {k: a @ b for k, (a, b) in head_factors(model, include_norm_weights).items()}


def _factored_norm_sq(a: Tensor, b: Tensor) -> Tensor:
    """``||a @ b||_F^2`` for ``a [..., d, r]``, ``b [..., r, d]`` via ``r x r`` Gram matrices."""
    return ((a.transpose(-1, -2) @ a) * (b @ b.transpose(-1, -2))).sum((-1, -2))


def composition_scores(model, mode: str, include_norm_weights: bool = True) -> Tensor:
    """``[L, H, L, H]`` composition scores (earlier head first); zero where ``l_B <= l_A``.

    Args:
        mode: ``"Q"``, ``"K"`` or ``"V"`` (module docstring, step 2).
        include_norm_weights: fold the norms' diagonal weights in (step 3).
    """
    if mode not in MODES:
        raise ConfigError(f"composition mode: {mode!r} is not one of {list(MODES)}")
    f = head_factors(model, include_norm_weights)
    with torch.no_grad():
        la, lb = (t.detach().double() for t in f["OV"])  # left: the writer's OV = la @ lb
        if mode == "V":
            ra, rb = la, lb
        elif mode == "Q":
            ra, rb = (t.detach().double() for t in f["QK"])
        else:  # K: ||W_QK^B W_OV^A^T|| = ||W_OV^A W_QK^B^T||, so the right matrix is QK^T
            qa, qb = (t.detach().double() for t in f["QK"])
            ra, rb = qb.transpose(-1, -2), qa.transpose(-1, -2)
        L, H = la.shape[:2]
        g_left = la.transpose(-1, -2) @ la  # [L, H, r, r]
        h_right = rb @ rb.transpose(-1, -2)  # [L, H, r, r]
        left_norm = _factored_norm_sq(la, lb).sqrt()  # [L, H]
        right_norm = _factored_norm_sq(ra, rb).sqrt()
        out = torch.zeros(L, H, L, H, dtype=torch.float64)
        for l_b in range(1, L):
            m = lb[:l_b, :, None] @ ra[l_b][None, None]  # [l_b, H_A, H_B, r, r]: B_1 A_2
            gm = g_left[:l_b, :, None] @ m
            mh = m @ h_right[l_b][None, None]
            comp = (gm * mh).sum((-1, -2)).clamp_min(0).sqrt()
            out[:l_b, :, l_b] = comp / left_norm[:l_b, :, None] / right_norm[l_b][None, None]
    return out


def composition_frame(scores: Tensor, mode: str, top_k: int | None = None):
    """Rows (writer -> reader) with columns component, layer, head (the READER), score, method,
    src_layer, src_head; only ``l_B > l_A`` pairs, optionally the ``top_k`` highest."""
    L, H = scores.shape[:2]
    rows = [{"component": f"L{la}H{ha}->L{lb}H{hb}", "layer": lb, "head": hb, "score": float(scores[la, ha, lb, hb]),
             "src_layer": la, "src_head": ha}
            for la in range(L) for ha in range(H) for lb in range(la + 1, L) for hb in range(H)]
    if top_k is not None:
        rows = sorted(rows, key=lambda r: -r["score"])[:top_k]
    return scores_frame(rows, f"{mode.lower()}_composition")


