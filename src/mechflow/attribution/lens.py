"""Logit lens and per-component direct logit attribution (DLA).

Logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"), tuned to RMSNorm models:

1. Cache the residual stream at ``blocks.0.hook_resid_pre`` (the embeddings) and at every
   ``blocks.L.hook_resid_post``.
2. Decode each one as if it were the last layer: apply the model's own final norm ``ln_final``
   with its scale recomputed from THAT residual (``rms(x)``, not the final layer's scale), then the
   unembedding (and the output logit soft-cap, if the model has one). Recomputing the scale is the
   natural choice for RMSNorm: the norm only rescales, so the lens logits of an early layer are
   its residual's direction read by ``W_U``, at the magnitude a last layer would give it.
3. Report the answer-direction logit difference ``logit[answer] - logit[wrong]`` per layer. At
   the last ``resid_post`` this is exactly the model's own logit difference.

Direct logit attribution (Elhage et al. 2021, "A mathematical framework"; Wang et al. 2022 IOI):

1. One clean forward caches ``hook_z`` of every head, ``hook_mlp_out``, ``blocks.0.hook_resid_pre``
   and the final norm scale ``ln_final.hook_scale`` at the read position.
2. The residual at the final position is an exact sum of components: embeddings, per head
   ``z_h W_O^h``, per layer the attention bias ``b_O``, per layer the MLP output.
3. FROZEN final-norm scale: with the scale ``s`` of the clean run held fixed the final norm is
   linear, ``ln_final(x) = x / s * w``, so each component's logit contribution is
   ``(c / s * w) . (W_U[:, answer] - W_U[:, wrong])`` and the contributions plus the unembedding
   bias difference sum to the model's logit difference exactly.
4. Gemma-style post-norms (``ln1_post`` on the attention output): ``hook_attn_out`` is taken after
   ``ln1_post``, which is again linear once its clean-run scale is frozen, so per-head terms are
   ``z_h W_O^h / s_post * w_post`` and still sum exactly. MLP outputs are read at ``hook_mlp_out``
   (after ``ln2_post``), so nothing is needed there.

Models with an output logit soft-cap (``cfg.output_logits_soft_cap > 0``): the lens applies the cap
(it reproduces the logits); DLA decomposes the logit difference BEFORE the cap (the cap is not
additive) and says so in `DLAResult.pre_softcap`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor

from mechflow.errors import ConfigError

log = logging.getLogger(__name__)

#: Column order of every per-component score table of mechflow.attribution.
FRAME_COLUMNS = ("component", "layer", "head", "score", "method")


# --------------------------------------------------------------------------------------------
# Tables


def scores_frame(rows: list[dict], method: str) -> pl.DataFrame:
    """Rows ``{component, layer, head, score, ...extra}`` -> a DataFrame with `FRAME_COLUMNS` first.

    ``layer``/``head`` are null where they do not apply (embeddings, biases, MLPs' head).
    """
    base = {"component": pl.Utf8, "layer": pl.Int64, "head": pl.Int64, "score": pl.Float64, "method": pl.Utf8}
    rows = [{**r, "method": method} for r in rows]
    if not rows:
        return pl.DataFrame(schema=base)
    df = pl.DataFrame(rows, infer_schema_length=None)
    for col, dtype in base.items():
        df = df.with_columns(pl.col(col).cast(dtype) if col in df.columns else pl.lit(None, dtype).alias(col))
    extra = [c for c in df.columns if c not in base]
    return df.select([*FRAME_COLUMNS, *extra])


def head_frame(scores: Tensor, method: str, component: str = "head") -> pl.DataFrame:
    """``[L, H]`` scores -> one row per head."""
    s = scores.detach().double().cpu()
    return scores_frame([{"component": f"{component} L{l}H{h}", "layer": l, "head": h, "score": float(s[l, h])}
                         for l in range(s.shape[0]) for h in range(s.shape[1])], method)


def layer_frame(scores: Tensor, method: str, component: str) -> pl.DataFrame:
    """``[L]`` scores -> one row per layer (``head`` null)."""
    s = scores.detach().double().cpu()
    return scores_frame([{"component": f"{component} L{l}", "layer": l, "score": float(s[l])}
                         for l in range(s.shape[0])], method)


# --------------------------------------------------------------------------------------------
# Shared helpers


def _as_ids(ids, n: int, name: str) -> Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if t.numel() == 1 and n > 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ConfigError(f"{name}: {t.numel()} ids for {n} prompts; give one id per prompt")
    return t


def answer_directions(model, answer_ids, wrong_ids=None, n: int | None = None) -> Tensor:
    """Per-prompt unembedding direction ``W_U[:, answer] - W_U[:, wrong]`` -> ``[n, d_model]``.

    With ``wrong_ids=None`` the direction is ``W_U[:, answer]`` (the answer logit itself).
    """
    a = torch.as_tensor(answer_ids).reshape(-1)
    n = n or a.numel()
    a = _as_ids(a, n, "answer_ids")
    d = model.W_U[:, a].T
    if wrong_ids is not None:
        d = d - model.W_U[:, _as_ids(wrong_ids, n, "wrong_ids")].T
    return d


def answer_bias(model, answer_ids, wrong_ids, n: int) -> Tensor:
    """``b_U[answer] - b_U[wrong]`` -> ``[n]``."""
    b = model.b_U[_as_ids(answer_ids, n, "answer_ids")]
    if wrong_ids is not None:
        b = b - model.b_U[_as_ids(wrong_ids, n, "wrong_ids")]
    return b


def norm_linear(norm, x: Tensor, scale: Tensor) -> Tensor:
    """The norm module ``norm`` applied to ``x`` with a FROZEN ``scale`` (no bias).

    RMSNorm(Pre): ``x / scale (* w)``; LayerNorm(Pre): ``(x - mean(x)) / scale (* w)``. Linear in
    ``x``, so it distributes over a sum of components. A LayerNorm bias is not added (it is a
    separate constant term, see `norm_bias`).
    """
    kind = type(norm).__name__
    if kind.startswith("LayerNorm"):
        x = x - x.mean(-1, keepdim=True)
    elif not kind.startswith("RMSNorm"):
        raise ConfigError(f"model normalization {kind!r} is not supported (RMSNorm or LayerNorm only)")
    x = x / scale
    w = getattr(norm, "w", None)
    return x * w if w is not None else x


def norm_bias(norm, like: Tensor) -> Tensor:
    b = getattr(norm, "b", None)
    return torch.zeros_like(like) if b is None else b.expand_as(like)


def has_post_norms(model) -> bool:
    """True for Gemma-style blocks (``ln1_post``/``ln2_post`` on the sublayer outputs)."""
    return bool(getattr(model.cfg, "use_normalization_before_and_after", False))


def softcapped(model) -> bool:
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return cap is not None and cap > 0


def pos_index(pos: int, n_pos: int) -> int:
    p = pos if pos >= 0 else n_pos + pos
    if not 0 <= p < n_pos:
        raise ConfigError(f"pos: {pos} is outside a {n_pos}-token prompt")
    return p


# --------------------------------------------------------------------------------------------
# Logit lens


@dataclass
class LensResult:
    """Logit lens at one position.

    Attributes:
        labels: ``["resid_pre 0", "resid_post 0", ..., "resid_post L-1"]``.
        logit_diff: ``[len(labels), n]`` answer-direction logit difference per point and prompt.
        logits: ``[len(labels), n, vocab]`` full lens logits (only with ``keep_logits``).
    """

    labels: list[str]
    logit_diff: Tensor
    logits: Tensor | None = None

    def to_frame(self, method: str = "logit_lens") -> pl.DataFrame:
        """One row per lens point, score = mean logit difference over prompts (+ std, n)."""
        ld = self.logit_diff.detach().double()
        rows = []
        for i, label in enumerate(self.labels):
            kind, layer = label.split()
            rows.append({"component": label, "layer": int(layer), "score": float(ld[i].mean()),
                         "std": float(ld[i].std()) if ld.shape[1] > 1 else 0.0, "n": int(ld.shape[1]),
                         "point": kind})
        return scores_frame(rows, method)


@torch.no_grad()
def logit_lens(model, tokens: Tensor, answer_ids, wrong_ids=None, pos: int = -1,
               keep_logits: bool = False) -> LensResult:
    """Decode ``resid_pre 0`` and every ``resid_post L`` through ``ln_final`` + unembed.

    Args:
        model: TransformerLens HookedTransformer (read-only).
        tokens: ``[n, pos]`` prompts.
        answer_ids, wrong_ids: ``[n]`` (or one id) tokens of the logit difference; ``wrong_ids``
            None -> the answer logit.
        pos: read position (default the last).
        keep_logits: also return the full ``[points, n, vocab]`` logits.

    Works on Gemma-3 (the residual is the stream after the post-norms; `ln_final` and the soft-cap
    are applied as the model does).
    """
    n, n_pos = tokens.shape
    p = pos_index(pos, n_pos)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{L}.hook_resid_post" for L in range(model.cfg.n_layers)]
    labels = ["resid_pre 0"] + [f"resid_post {L}" for L in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    resid = torch.stack([cache[name][:, p] for name in names])  # [points, n, d_model]
    logits = model.unembed(model.ln_final(resid))
    if softcapped(model):
        cap = model.cfg.output_logits_soft_cap
        logits = cap * torch.tanh(logits / cap)
    a = _as_ids(answer_ids, n, "answer_ids").to(logits.device)
    ld = logits.gather(-1, a.view(1, n, 1).expand(len(names), n, 1)).squeeze(-1)
    if wrong_ids is not None:
        w = _as_ids(wrong_ids, n, "wrong_ids").to(logits.device)
        ld = ld - logits.gather(-1, w.view(1, n, 1).expand(len(names), n, 1)).squeeze(-1)
    return LensResult(labels, ld, logits if keep_logits else None)


# --------------------------------------------------------------------------------------------
# Direct logit attribution


@dataclass
class DLAResult:
    """Direct logit attribution of every component at one position, per prompt.

    Attributes:
        embed: ``[n]`` the embeddings (``blocks.0.hook_resid_pre``).
        heads: ``[L, H, n]`` each head's ``z W_O`` (through a frozen ``ln1_post`` on Gemma).
        attn_bias: ``[L, n]`` each layer's ``b_O``.
        mlps: ``[L, n]`` each MLP's output.
        constant: ``[n]`` unembedding bias difference (+ a LayerNorm final bias, if any).
        logit_diff: ``[n]`` the model's logit difference (before any soft-cap).
        final_scale: ``[n]`` the frozen final-norm scale.
        pre_softcap: True when the model soft-caps logits (DLA decomposes the uncapped value).
    """

    embed: Tensor
    heads: Tensor
    attn_bias: Tensor
    mlps: Tensor
    constant: Tensor
    logit_diff: Tensor
    final_scale: Tensor
    pre_softcap: bool = False

    def total(self) -> Tensor:
        """Sum of all components ``[n]`` (equals ``logit_diff`` up to float rounding)."""
        return self.embed + self.heads.sum((0, 1)) + self.attn_bias.sum(0) + self.mlps.sum(0) + self.constant

    def to_frame(self, method: str = "dla") -> pl.DataFrame:
        """One row per component, score = mean over prompts."""
        rows = [{"component": "embed", "score": float(self.embed.mean())}]
        L, H = self.heads.shape[:2]
        for l in range(L):
            rows += [{"component": f"head L{l}H{h}", "layer": l, "head": h, "score": float(self.heads[l, h].mean())}
                     for h in range(H)]
            rows.append({"component": f"attn_bias L{l}", "layer": l, "score": float(self.attn_bias[l].mean())})
            rows.append({"component": f"mlp L{l}", "layer": l, "score": float(self.mlps[l].mean())})
        rows.append({"component": "unembed_bias", "score": float(self.constant.mean())})
        return scores_frame(rows, method)


def head_outputs(model, z: Tensor, layer: int) -> Tensor:
    """``hook_z [..., H, d_head]`` -> per-head residual writes ``[..., H, d_model]`` (no bias)."""
    return torch.einsum("...hd,hdm->...hm", z, model.blocks[layer].attn.W_O)


@torch.no_grad()
def direct_logit_attribution(model, tokens: Tensor, answer_ids, wrong_ids=None, pos: int = -1) -> DLAResult:
    """Exact additive decomposition of the logit difference at ``pos`` with frozen norm scales.

    See the module docstring. Works on SmolLM2 (llama-like) and Gemma-3 (post-norms frozen).
    """
    n, n_pos = tokens.shape
    p = pos_index(pos, n_pos)
    L = model.cfg.n_layers
    post = has_post_norms(model)
    wanted = {"blocks.0.hook_resid_pre", "ln_final.hook_scale", f"blocks.{L - 1}.hook_resid_post"}
    for l in range(L):
        wanted |= {f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out"}
        if post:
            wanted.add(f"blocks.{l}.ln1_post.hook_scale")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    s_final = cache["ln_final.hook_scale"][:, p]  # [n, 1]
    direction = answer_directions(model, answer_ids, wrong_ids, n).to(logits.dtype)  # [n, d]

    def read(x: Tensor) -> Tensor:  # x [..., n, d_model] -> [..., n]
        return (norm_linear(model.ln_final, x, s_final) * direction).sum(-1)

    embed = read(cache["blocks.0.hook_resid_pre"][:, p])
    heads, biases, mlps = [], [], []
    for l in range(L):
        block = model.blocks[l]
        res = head_outputs(model, cache[f"blocks.{l}.attn.hook_z"][:, p], l).transpose(0, 1)  # [H, n, d]
        bias = block.attn.b_O.expand(n, -1)
        if post:
            s_post = cache[f"blocks.{l}.ln1_post.hook_scale"][:, p]
            res = norm_linear(block.ln1_post, res, s_post)
            bias = norm_linear(block.ln1_post, bias, s_post) + norm_bias(block.ln1_post, bias)
        heads.append(read(res))
        biases.append(read(bias))
        mlps.append(read(cache[f"blocks.{l}.hook_mlp_out"][:, p]))
    final_bias = norm_bias(model.ln_final, direction)
    constant = answer_bias(model, answer_ids, wrong_ids, n).to(logits.dtype) + (final_bias * direction).sum(-1)
    if softcapped(model):  # the cap is not additive: decompose the uncapped logits
        logits = model.unembed(model.ln_final(cache[f"blocks.{L - 1}.hook_resid_post"][:, p : p + 1]))
        p = 0
    raw = _gather_diff(logits[:, p], answer_ids, wrong_ids, n)
    return DLAResult(embed=embed, heads=torch.stack(heads), attn_bias=torch.stack(biases), mlps=torch.stack(mlps),
                     constant=constant, logit_diff=raw, final_scale=s_final.squeeze(-1), pre_softcap=softcapped(model))


def _gather_diff(logits: Tensor, answer_ids, wrong_ids, n: int) -> Tensor:
    """``logits [n, vocab]`` -> ``[n]`` answer (minus wrong) logit."""
    out = logits.gather(-1, _as_ids(answer_ids, n, "answer_ids").view(n, 1).to(logits.device)).squeeze(-1)
    if wrong_ids is not None:
        out = out - logits.gather(-1, _as_ids(wrong_ids, n, "wrong_ids").view(n, 1).to(logits.device)).squeeze(-1)
    return out
