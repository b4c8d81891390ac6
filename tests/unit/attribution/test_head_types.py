"""Head typing: hand-made patterns get the expected scores; IOI path patching equals a manual rerun."""

from __future__ import annotations

import polars as pl
import torch

from mechflow.attribution.head_types import (
    IOIRoleThresholds,
    classify_ioi_heads,
    head_type_scores,
    path_patch_to_queries,
    repeated_random_tokens,
    scores_from_patterns,
)

T = 5  # repeated segment length; with BOS the sequence has 1 + 2T = 11 tokens


def _crafted(kind: str, n_pos: int) -> torch.Tensor:
    """A valid causal pattern [q, k] of one ideal head type (o = 1: BOS at position 0)."""
    p = torch.zeros(n_pos, n_pos, dtype=torch.float64)
    for q in range(n_pos):
        if kind == "previous_token":
            k = max(q - 1, 0)
        elif kind == "induction":
            k = q - T + 1 if q >= 1 + T else 0
        elif kind == "duplicate_token":
            k = q - T if q >= 1 + T else 0
        else:  # bos
            k = 0
        p[q, k] = 1.0
    return p


def test_crafted_patterns_get_expected_type_scores(tiny_llama):
    kinds = ["previous_token", "induction", "duplicate_token", "bos"]
    n_pos = 1 + 2 * T

    def override(act, hook):  # layer 0: head h is an ideal head of kinds[h]
        return torch.stack([_crafted(k, n_pos) for k in kinds]).expand_as(act).clone()

    res = head_type_scores(tiny_llama, n_seqs=3, seq_len=T, bos_id=1,
                           fwd_hooks=[("blocks.0.attn.hook_pattern", override)])
    for h, kind in enumerate(kinds):
        assert res.scores[kind][0, h].item() == 1.0, kind
    # Ideal heads of one kind score exactly what their definitions imply for the other kinds.
    assert res.scores["previous_token"][0, 1:].tolist() == [0.0, 0.0, 0.0]
    assert res.scores["induction"][0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert res.scores["duplicate_token"][0].tolist() == [0.0, 0.0, 1.0, 0.0]
    # BOS score of the induction head: queries 1..T (first copy) of 2T queries attend to BOS.
    assert abs(res.scores["bos"][0, 1].item() - T / (2 * T)) < 1e-12
    assert res.top("induction", 1)[0][:2] == (0, 1)
    assert res.to_frame().height == 4 * 2 * 4


def test_scores_on_model_match_definition(tiny_llama):
    toks = repeated_random_tokens(4, T, 50, seed=3, bos_id=1, exclude_ids=[0])
    assert toks.shape == (4, 1 + 2 * T) and torch.equal(toks[:, 1:1 + T], toks[:, 1 + T:])
    assert not ((toks[:, 1:] == 0) | (toks[:, 1:] == 1)).any()
    res = head_type_scores(tiny_llama, n_seqs=4, seq_len=T, seed=3, bos_id=1, exclude_ids=[0])
    _, cache = tiny_llama.run_with_cache(toks)
    p = cache["blocks.1.attn.hook_pattern"][:, 2]  # [n, q, k]
    ind = torch.stack([p[:, 1 + T + j, 2 + j] for j in range(T)]).mean()
    prev = torch.stack([p[:, q, q - 1] for q in range(2, 1 + T)]).mean()
    torch.testing.assert_close(res.scores["induction"][1, 2], ind)
    torch.testing.assert_close(res.scores["previous_token"][1, 2], prev)
    torch.testing.assert_close(res.scores["bos"][1, 2], p[:, 1:, 0].mean())
    pats = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(2)], 1)
    torch.testing.assert_close(scores_from_patterns(pats, T, True)["duplicate_token"], res.scores["duplicate_token"])


def test_query_path_patching_equals_manual_rerun(tiny_llama):
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, 50, (2, 6), generator=g)
    corr = torch.randint(0, 50, (2, 6), generator=g)

    def metric(logits):
        return logits[:, -1, 3] - logits[:, -1, 4]

    senders, receivers = [(0, 1), (0, 3), (1, 0)], [(1, 2)]
    got = path_patch_to_queries(tiny_llama, clean, corr, metric, senders, receivers, max_batch=4)
    _, c_cache = tiny_llama.run_with_cache(clean)
    _, k_cache = tiny_llama.run_with_cache(corr)
    m_clean = metric(tiny_llama(clean))
    attn0, blk1 = tiny_llama.blocks[0].attn, tiny_llama.blocks[1]
    for i, (l, h) in enumerate(senders[:2]):
        dz = k_cache["blocks.0.attn.hook_z"][:, :, h] - c_cache["blocks.0.attn.hook_z"][:, :, h]
        resid = c_cache["blocks.1.hook_resid_pre"] + dz @ attn0.W_O[h]  # only the direct path changes
        q = blk1.ln1(resid) @ blk1.attn.W_Q[2] + blk1.attn.b_Q[2]

        def set_q(act, hook, q=q):
            act[:, :, 2] = q
            return act

        ref = metric(tiny_llama.run_with_hooks(clean, fwd_hooks=[("blocks.1.attn.hook_q", set_q)])) - m_clean
        torch.testing.assert_close(got[i], ref, rtol=0, atol=1e-10)
        assert ref.abs().max() > 1e-6
    assert torch.all(got[2] == 0)  # same layer as the receiver: no path


def test_classify_ioi_heads_applies_documented_criteria():
    rows = [  # layer, head, dla, attn_io, attn_s1, attn_s2, q_path
        (3, 0, 2.0, 0.6, 0.1, 0.1, None),   # name mover
        (3, 1, 0.3, 0.9, 0.0, 0.0, None),   # attends IO but dla < 0.2 * 2.0
        (2, 0, 1.0, 0.1, 0.1, 0.5, None),   # attends S2: not a name mover
        (1, 0, 0.0, 0.0, 0.1, 0.5, -1.0),   # S-inhibition
        (1, 1, 0.0, 0.0, 0.1, 0.05, -1.0),  # strong q_path but does not attend S2
        (0, 0, 0.0, 0.0, 0.0, 0.5, -0.1),   # weak q_path
    ]
    table = pl.DataFrame(rows, schema=["layer", "head", "dla", "attn_io", "attn_s1", "attn_s2", "q_path"],
                         orient="row")
    roles = classify_ioi_heads(table, IOIRoleThresholds())["role"].to_list()
    assert roles == ["name_mover", None, None, "s_inhibition", None, None]
