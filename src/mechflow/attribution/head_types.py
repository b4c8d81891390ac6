"""Head typing: attention-pattern scores on diagnostic sequences, and IOI roles from patching.

Pattern scores (Olsson et al. 2022 "In-context learning and induction heads"; TransformerLens
``head_detector``). On ``n_seqs`` sequences ``[BOS] r_1..r_T r_1..r_T`` of seeded random tokens
(offset ``o`` = 1 with BOS, 0 without), averaged over sequences and the listed queries:

1. previous-token: ``A[q, q-1]`` for the first copy, ``q = o+1 .. o+T-1`` (keys are never BOS).
2. induction: ``A[o+T+j, o+j+1]`` (second copy attends to the token AFTER the previous occurrence
   of its own token), ``j = 0..T-1``.
3. duplicate-token: ``A[o+T+j, o+j]`` (attends to the previous occurrence itself).
4. BOS / sink: ``A[q, 0]`` for every ``q >= 1`` (mean attention to position 0).

IOI roles (Wang et al. 2022, "Interpretability in the wild"), at the END (last) position:

1. Positions: IO = where the clean prompt holds the answer token, S1/S2 = first/second
   occurrence of the wrong (subject) token.
2. Direct effect of each head: its direct logit attribution on the clean run (`lens`, final
   norm scale frozen) and its direct-path noising effect ``DLA_h(corrupted z) - DLA_h(clean z)``
   (exact patching of the head -> logits path with the final norm frozen).
3. Name movers: ``dla >= nm_rel * max_h dla`` and ``dla > 0``, attending to IO from END with
   ``attn_io >= nm_min_attn`` and ``attn_io > max(attn_s1, attn_s2)``.
4. S-inhibition: exact two-step path patching (Wang et al. §3): (a) run the clean prompts with
   every head's ``z`` and every MLP output frozen to their clean values except the sender head,
   whose ``z`` comes from the corrupted prompts, and record the name movers' queries
   (``hook_q``); (b) run the clean prompts with only those queries replaced, everything else
   recomputed, and read the metric. ``q_path = m(b) - m(clean)``; a head is an S-inhibition
   candidate when it sits below some name mover, ``-q_path >= si_rel * max(-q_path) > 0`` and
   it attends to S2 from END with ``attn_s2 >= si_min_attn``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor

from mechflow.attribution.attention import attention_patterns
from mechflow.attribution.lens import (
    answer_directions,
    has_post_norms,
    head_frame,
    head_outputs,
    norm_linear,
    scores_frame,
)
from mechflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SCORE_KINDS = ("previous_token", "induction", "duplicate_token", "bos")


# --------------------------------------------------------------------------------------------
# Pattern scores


def repeated_random_tokens(n_seqs: int, seq_len: int, d_vocab: int, seed: int = 0, bos_id: int | None = None,
                           exclude_ids=()) -> Tensor:
    """``[n_seqs, o + 2*seq_len]``: ``[BOS] R R`` with ``R`` seeded random tokens (no repeats inside R)."""
    if seq_len < 2 or n_seqs < 1:
        raise ConfigError(f"head_types.seq_len={seq_len} must be >= 2 and n_seqs={n_seqs} >= 1")
    allowed = torch.ones(d_vocab, dtype=torch.bool)
    for i in exclude_ids:
        allowed[int(i)] = False
    if bos_id is not None:
        allowed[bos_id] = False
    pool = allowed.nonzero().squeeze(-1)
    if len(pool) < seq_len:
        raise ConfigError(f"head_types.seq_len={seq_len} exceeds the {len(pool)} usable token ids")
    g = torch.Generator().manual_seed(seed)
    rows = [pool[torch.randperm(len(pool), generator=g)[:seq_len]] for _ in range(n_seqs)]
    r = torch.stack(rows)
    seq = torch.cat([r, r], dim=1)
    if bos_id is not None:
        seq = torch.cat([torch.full((n_seqs, 1), bos_id, dtype=seq.dtype), seq], dim=1)
    return seq


def scores_from_patterns(patterns: Tensor, seq_len: int, has_bos: bool) -> dict[str, Tensor]:
    """``[n, L, H, q, k]`` patterns of `repeated_random_tokens` -> ``{kind: [L, H]}`` (see module doc)."""
    o, T = int(has_bos), seq_len
    if patterns.shape[-1] != o + 2 * T:
        raise ConfigError(f"patterns have {patterns.shape[-1]} positions, expected {o + 2 * T} for seq_len={T}")
    p = patterns.double()
    j = torch.arange(T)
    q_prev = torch.arange(o + 1, o + T)
    return {
        "previous_token": p[..., q_prev, q_prev - 1].mean((0, -1)),
        "induction": p[..., o + T + j, o + j + 1].mean((0, -1)),
        "duplicate_token": p[..., o + T + j, o + j].mean((0, -1)),
        "bos": p[..., 1:, 0].mean((0, -1)),
    }


@dataclass
class HeadTypeScores:
    """``[L, H]`` score per kind, with the diagnostic setting that produced them."""

    scores: dict[str, Tensor]
    seq_len: int
    n_seqs: int
    seed: int

    def top(self, kind: str, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads of one kind: ``(layer, head, score)``."""
        s = self.scores[kind]
        vals, idx = s.flatten().topk(min(k, s.numel()))
        H = s.shape[1]
        return [(int(i) // H, int(i) % H, float(v)) for v, i in zip(vals, idx)]

    def to_frame(self) -> pl.DataFrame:
        return pl.concat([head_frame(self.scores[k], method=f"head_type_{k}") for k in SCORE_KINDS])


def head_type_scores(model, n_seqs: int = 8, seq_len: int = 32, seed: int = 0, bos_id: int | None = None,
                     exclude_ids=(), fwd_hooks=()) -> HeadTypeScores:
    """Previous-token, induction, duplicate-token and BOS scores of every head.

    Args:
        bos_id: prepended when given (use the model's BOS convention).
        exclude_ids: token ids never drawn (e.g. the tokenizer's special tokens).
        fwd_hooks: extra hooks (tests override ``hook_pattern`` with hand-made patterns).
    """
    toks = repeated_random_tokens(n_seqs, seq_len, model.cfg.d_vocab, seed, bos_id, exclude_ids)
    pats = attention_patterns(model, toks, fwd_hooks=fwd_hooks)
    return HeadTypeScores(scores_from_patterns(pats, seq_len, bos_id is not None), seq_len, n_seqs, seed)


# --------------------------------------------------------------------------------------------
# IOI roles


def ioi_positions(clean_tokens: Tensor, answer_ids: Tensor, wrong_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(IO, S1, S2) positions ``[n]`` each; DataError unless IO occurs once and S twice."""
    io, s1, s2 = [], [], []
    for i, row in enumerate(clean_tokens):
        a = (row == answer_ids[i]).nonzero().squeeze(-1)
        s = (row == wrong_ids[i]).nonzero().squeeze(-1)
        if len(a) != 1 or len(s) != 2:
            raise DataError(f"IOI prompt {i}: the answer token occurs {len(a)} times and the subject token "
                            f"{len(s)} times (need 1 and 2); use prompts from the ioi task")
        io.append(int(a[0]))
        s1.append(int(s[0]))
        s2.append(int(s[1]))
    return torch.tensor(io), torch.tensor(s1), torch.tensor(s2)


@torch.no_grad()
def head_direct_effects(model, clean_tokens: Tensor, corrupted_tokens: Tensor, answer_ids, wrong_ids
                        ) -> tuple[Tensor, Tensor]:
    """(clean DLA ``[L, H, n]``, direct-path noising effect ``[L, H, n]``) at the last position.

    Both use the clean run's final-norm scale (and ``ln1_post`` scale on Gemma), frozen.
    """
    n = clean_tokens.shape[0]
    L = model.cfg.n_layers
    post = has_post_norms(model)
    names = {"ln_final.hook_scale"} | {f"blocks.{l}.attn.hook_z" for l in range(L)}
    if post:
        names |= {f"blocks.{l}.ln1_post.hook_scale" for l in range(L)}
    _, clean = model.run_with_cache(clean_tokens, names_filter=lambda x: x in names)
    _, corr = model.run_with_cache(corrupted_tokens, names_filter=lambda x: x.endswith("hook_z"))
    direction = answer_directions(model, answer_ids, wrong_ids, n)
    s_final = clean["ln_final.hook_scale"][:, -1]

    def dla(z: Tensor, l: int) -> Tensor:  # z [n, H, d_head] -> [H, n]
        res = head_outputs(model, z, l).transpose(0, 1)
        if post:
            res = norm_linear(model.blocks[l].ln1_post, res, clean[f"blocks.{l}.ln1_post.hook_scale"][:, -1])
        return (norm_linear(model.ln_final, res, s_final) * direction).sum(-1)

    d_clean = torch.stack([dla(clean[f"blocks.{l}.attn.hook_z"][:, -1], l) for l in range(L)])
    d_corr = torch.stack([dla(corr[f"blocks.{l}.attn.hook_z"][:, -1], l) for l in range(L)])
    return d_clean, d_corr - d_clean


@torch.no_grad()
def path_patch_to_queries(model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Callable[[Tensor], Tensor],
                          senders: list[tuple[int, int]], receivers: list[tuple[int, int]],
                          max_batch: int = 64) -> Tensor:
    """Exact path patching sender head -> receivers' queries (noising), ``[len(senders), n]``.

    See the module docstring, step 4 of IOI roles. Senders at or above every receiver's layer
    have no path and get exactly 0.
    """
    n = clean_tokens.shape[0]
    L = model.cfg.n_layers
    recv_layers = sorted({l for l, _ in receivers})
    want = {f"blocks.{l}.attn.hook_z" for l in range(L)} | {f"blocks.{l}.hook_mlp_out" for l in range(L)}
    _, clean = model.run_with_cache(clean_tokens, names_filter=lambda x: x in want)
    _, corr = model.run_with_cache(corrupted_tokens, names_filter=lambda x: x.endswith("hook_z"))
    m_clean = metric(model(clean_tokens))
    out = torch.zeros(len(senders), n, dtype=m_clean.dtype)
    live = [i for i, (l, _) in enumerate(senders) if l < max(recv_layers, default=-1)]
    copies = max(1, max_batch // n)
    for start in range(0, len(live), copies):
        chunk = live[start:start + copies]
        c = len(chunk)
        base = clean_tokens.repeat(c, 1)
        hooks = []
        for l in range(L):
            hooks.append((f"blocks.{l}.attn.hook_z", _freeze_z(clean[f"blocks.{l}.attn.hook_z"],
                                                              corr[f"blocks.{l}.attn.hook_z"], l,
                                                              [senders[i] for i in chunk], n)))
            hooks.append((f"blocks.{l}.hook_mlp_out", _repeat(clean[f"blocks.{l}.hook_mlp_out"], c)))
        seen: dict[int, Tensor] = {}

        def grab(act: Tensor, hook, seen=seen) -> None:
            seen[int(hook.name.split(".")[1])] = act.clone()

        hooks += [(f"blocks.{l}.attn.hook_q", grab) for l in recv_layers]
        model.run_with_hooks(base, fwd_hooks=hooks, stop_at_layer=max(recv_layers) + 1)

        def put(act: Tensor, hook, seen=seen) -> Tensor:
            l = int(hook.name.split(".")[1])
            for rl, rh in receivers:
                if rl == l:
                    act[:, :, rh] = seen[l][:, :, rh]
            return act

        logits = model.run_with_hooks(base, fwd_hooks=[(f"blocks.{l}.attn.hook_q", put) for l in recv_layers])
        m = torch.stack([metric(logits[j * n:(j + 1) * n]) for j in range(c)])
        out[chunk] = m - m_clean
    return out


def _repeat(x: Tensor, c: int):
    def hook(act: Tensor, hook=None) -> Tensor:
        return x.repeat(c, *[1] * (x.dim() - 1))
    return hook


def _freeze_z(z_clean: Tensor, z_corr: Tensor, layer: int, senders: list[tuple[int, int]], n: int):
    def hook(act: Tensor, hook=None) -> Tensor:
        new = z_clean.repeat(len(senders), 1, 1, 1)
        for j, (l, h) in enumerate(senders):
            if l == layer:
                new[j * n:(j + 1) * n, :, h] = z_corr[:, :, h]
        return new
    return hook


@dataclass(frozen=True)
class IOIRoleThresholds:
    """Criteria of `ioi_head_roles` (module docstring, steps 3-4)."""

    nm_rel: float = 0.2
    nm_min_attn: float = 0.2
    si_rel: float = 0.2
    si_min_attn: float = 0.1


def classify_ioi_heads(table: pl.DataFrame, th: IOIRoleThresholds | None = None) -> pl.DataFrame:
    """Add a ``role`` column (``name_mover`` / ``s_inhibition`` / null) to an `ioi_head_roles` table.

    The table needs columns layer, head, dla, attn_io, attn_s1, attn_s2 and (for S-inhibition)
    q_path (null where not computed).
    """
    th = th or IOIRoleThresholds()
    max_dla = table["dla"].max()
    nm = (pl.col("dla") > 0) & (pl.col("dla") >= th.nm_rel * max_dla) & (pl.col("attn_io") >= th.nm_min_attn) \
        & (pl.col("attn_io") > pl.max_horizontal("attn_s1", "attn_s2"))
    table = table.with_columns(nm.alias("_nm"))
    nm_layers = table.filter(pl.col("_nm"))["layer"]
    top_nm = int(nm_layers.max()) if len(nm_layers) else -1
    si_score = -pl.col("q_path")
    max_si = table.select(si_score.max()).item() if "q_path" in table.columns else None
    if max_si is None or max_si <= 0:
        si = pl.lit(False)
    else:
        si = (pl.col("layer") < top_nm) & (si_score >= th.si_rel * max_si) & (pl.col("attn_s2") >= th.si_min_attn) \
            & ~pl.col("_nm")
    table = table.with_columns(si.fill_null(False).alias("_si"))
    role = pl.when(pl.col("_nm")).then(pl.lit("name_mover")).when(pl.col("_si")).then(pl.lit("s_inhibition"))
    return table.with_columns(role.otherwise(None).alias("role")).drop("_nm", "_si")


def ioi_head_roles(model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Callable[[Tensor], Tensor],
                   answer_ids: Tensor, wrong_ids: Tensor, th: IOIRoleThresholds | None = None,
                   max_batch: int = 64, si_layers_below: int | None = None) -> pl.DataFrame:
    """Per-head IOI evidence and role (one row per head).

    Cost: two forwards of the prompts per candidate S-inhibition sender (every head below the top
    name mover); ``si_layers_below`` limits senders to that many layers below it (null q_path
    elsewhere, so those heads cannot be classified S-inhibition).

    Columns: component, layer, head, score (= dla), method, dla, direct_patch, attn_io, attn_s1,
    attn_s2, q_path (null above the top name mover), role.
    """
    n = clean_tokens.shape[0]
    answer_ids, wrong_ids = torch.as_tensor(answer_ids).reshape(n), torch.as_tensor(wrong_ids).reshape(n)
    io, s1, s2 = ioi_positions(clean_tokens, answer_ids, wrong_ids)
    dla, direct = head_direct_effects(model, clean_tokens, corrupted_tokens, answer_ids, wrong_ids)
    pats = attention_patterns(model, clean_tokens)[:, :, :, -1]  # [n, L, H, k] from END
    rows_idx = torch.arange(n)

    def att(pos: Tensor) -> Tensor:
        return pats[rows_idx, :, :, pos].mean(0)  # [L, H]

    a_io, a_s1, a_s2 = att(io), att(s1), att(s2)
    L, H = dla.shape[:2]
    rows = [{"component": f"head L{l}H{h}", "layer": l, "head": h, "score": float(dla[l, h].mean()),
             "dla": float(dla[l, h].mean()), "direct_patch": float(direct[l, h].mean()),
             "attn_io": float(a_io[l, h]), "attn_s1": float(a_s1[l, h]), "attn_s2": float(a_s2[l, h]),
             "q_path": None} for l in range(L) for h in range(H)]
    table = classify_ioi_heads(scores_frame(rows, "ioi_roles").with_columns(pl.col("q_path").cast(pl.Float64)), th)
    movers = [(r["layer"], r["head"]) for r in table.filter(pl.col("role") == "name_mover").iter_rows(named=True)]
    if not movers:
        log.info("no name-mover heads met the criterion; S-inhibition not evaluated")
        return table
    top = max(l for l, _ in movers)
    first = 0 if si_layers_below is None else max(0, top - si_layers_below)
    senders = [(l, h) for l in range(first, top) for h in range(H)]
    q_path = path_patch_to_queries(model, clean_tokens, corrupted_tokens, metric, senders, movers, max_batch)
    values = {s: float(v) for s, v in zip(senders, q_path.mean(-1))}
    table = table.with_columns(pl.Series("q_path", [values.get((r["layer"], r["head"]))
                                                    for r in table.iter_rows(named=True)], dtype=pl.Float64))
    return classify_ioi_heads(table.drop("role"), th)
