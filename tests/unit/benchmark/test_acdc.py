"""ACDC against a brute-force reference of the ORIGINAL sequential algorithm on the tiny llama.

The reference below is written as plainly as possible and shares nothing with the fast
implementation except the circuits package's exact edge-patched `graph_forward`: for every
candidate it runs the FULL model with the complete set of removed edges and computes the metric
from the full logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from mechflow.attribution.patching import TokenPairs
from mechflow.benchmark.acdc import Acdc, depth_weighted_factor, stage_costs
from mechflow.benchmark.config import AcdcConfig, RestrictionConfig
from mechflow.benchmark.metrics import kl_to_clean
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.resume import ResumableForward, StageCache
from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph
from mechflow.testing import random_token_pairs


def pairs(seed: int = 0, n: int = 4, pos: int = 6) -> TokenPairs:
    return random_token_pairs(seed, n, pos)


def plain_acdc(model, batch, tau, metric="kl", allowed=None, prune_dead=True):
    """Original ACDC, brute force. Returns (kept mask, [(sender, receiver, D after or None, removed)])."""
    g = EdgeGraph.from_cfg(model.cfg)
    allowed = g.valid.clone() if allowed is None else allowed
    _, corrupted = graph_forward(model, batch.corrupted_tokens, g, record=True)
    with torch.no_grad():
        clean_logits = model(batch.clean_tokens)

    def distance(removed):
        logits, _ = graph_forward(model, batch.clean_tokens, g, corrupted=corrupted, removed=removed)
        if metric == "kl":
            p_log = torch.log_softmax(clean_logits[:, -1].double(), -1)
            q_log = torch.log_softmax(logits[:, -1].double(), -1)
            per_prompt = [float((p_log[i].exp() * (p_log[i] - q_log[i])).sum()) for i in range(len(p_log))]
            return sum(per_prompt) / len(per_prompt)
        return abs(float(batch.metric(logits).double().mean()) - float(batch.metric(clean_logits).double().mean()))

    names = g.receiver_names
    order = ["logits"]
    for L in reversed(range(g.n_layers)):
        order.append(f"m{L}")
        for kind in "qkv":
            order += [f"a{L}.h{h}<{kind}>" for h in reversed(range(g.n_heads))]
    log = []
    with torch.no_grad():
        removed = torch.zeros_like(g.valid)
        current = distance(removed)
        for rname in order:
            r = names.index(rname)
            senders = [s for s in reversed(range(g.n_senders)) if allowed[s, r]]
            node = None if rname == "logits" else g.sender_names.index(rname.split("<")[0])
            if prune_dead and node is not None and not any(
                    g.valid[node, c] and not removed[node, c] for c in range(g.n_receivers)):
                for s in senders:
                    removed[s, r] = True
                    log.append((s, r, None, True))
                continue
            for s in senders:
                trial = removed.clone()
                trial[s, r] = True
                after = distance(trial)
                if after - current < tau:
                    removed, current = trial, after
                    log.append((s, r, after, True))
                else:
                    log.append((s, r, after, False))
    return allowed & ~removed, log


def assert_same_run(run, ref_kept, ref_log):
    assert torch.equal(run.kept, ref_kept)
    assert [(s.sender, s.receiver, s.removed, s.evaluated) for s in run.steps] == \
        [(s, r, rem, after is not None) for s, r, after, rem in ref_log]
    ours = torch.tensor(run.trajectory, dtype=torch.float64)
    theirs = torch.tensor([after for *_, after, _ in ref_log if after is not None], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11)


@pytest.fixture(scope="module")
def batch():
    return pairs(0, n=4, pos=6)


@pytest.mark.parametrize("speculation", [1, 4])
def test_kl_acdc_matches_brute_force_for_several_taus(tiny_llama, batch, speculation):
    acdc = Acdc(tiny_llama, batch, AcdcConfig(metric="kl", speculation=speculation))
    sizes = []
    for tau in (0.003, 0.03, 0.3):
        run = acdc.run(tau)
        ref_kept, ref_log = plain_acdc(tiny_llama, batch, tau)
        assert_same_run(run, ref_kept, ref_log)
        sizes.append(run.n_kept)
        assert 0 < run.n_kept < acdc.restriction.n_edges  # the taus make real decisions
        if speculation == 1:
            assert run.n_wasted == 0 and run.n_forward == run.n_evaluations
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3


def test_task_metric_and_restricted_graph_match_brute_force(tiny_llama, batch):
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    restriction = EdgeRestriction.build(g, RestrictionConfig(last_layers=1, components="heads"))
    acdc = Acdc(tiny_llama, batch, AcdcConfig(metric="task", speculation=3), restriction)
    for tau in (0.02, 0.1):
        run = acdc.run(tau)
        ref_kept, ref_log = plain_acdc(tiny_llama, batch, tau, metric="task", allowed=restriction.mask)
        assert_same_run(run, ref_kept, ref_log)
        assert not (run.kept & ~restriction.mask).any()


def test_prune_dead_off_matches_brute_force(tiny_llama, batch):
    acdc = Acdc(tiny_llama, batch, AcdcConfig(prune_dead=False))
    run = acdc.run(0.1)
    assert_same_run(run, *plain_acdc(tiny_llama, batch, 0.1, prune_dead=False))
    assert all(s.evaluated for s in run.steps)


def test_tau_zero_keeps_every_edge_that_raises_the_metric_and_huge_tau_removes_all(tiny_llama, batch):
    for metric in ("kl", "task"):
        acdc = Acdc(tiny_llama, batch, AcdcConfig(metric=metric, speculation=2))
        run = acdc.run(0.0)
        evaluated = [s for s in run.steps if s.evaluated]
        assert evaluated and all(s.removed == (s.increase < 0) for s in evaluated)
        assert all(not s.removed for s in evaluated if s.increase > 0)
        assert all(run.kept[s.sender, s.receiver] != s.removed for s in evaluated)
        everything = acdc.run(1e12)
        assert everything.n_kept == 0
        assert len(everything.steps) == acdc.restriction.n_edges


def test_kl_is_zero_with_nothing_patched_and_matches_corrupted_run_with_everything_patched(tiny_llama, batch):
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    acdc = Acdc(tiny_llama, batch)
    assert acdc.full_metric == 0.0
    nothing = acdc.forward.evaluate(torch.zeros_like(g.valid), g.logits_receiver)
    assert float(acdc.metric(nothing)[0]) == 0.0
    with torch.no_grad():
        clean, corrupted = tiny_llama(batch.clean_tokens)[:, -1], tiny_llama(batch.corrupted_tokens)[:, -1]
    everything = acdc.forward.evaluate(g.valid.clone(), g.mlp_receiver(0) - 3 * g.n_heads)  # layer-0 start
    expected = torch.nn.functional.kl_div(torch.log_softmax(corrupted.double(), -1),
                                          torch.log_softmax(clean.double(), -1), log_target=True,
                                          reduction="batchmean")
    assert math.isclose(float(acdc.metric(everything)[0]), float(expected), rel_tol=1e-10)
    assert float(kl_to_clean(torch.log_softmax(clean.double(), -1), corrupted.unsqueeze(0))[0]) > 0.01


@torch.no_grad()
def test_resumed_forward_equals_full_edge_patched_forward_at_every_stage(tiny_llama, batch):
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    fwd = ResumableForward(tiny_llama, g, batch.clean_tokens, batch.corrupted_tokens)
    torch.testing.assert_close(fwd.clean_last_logits, tiny_llama(batch.clean_tokens)[:, -1], rtol=0, atol=1e-12)
    _, corrupted = graph_forward(tiny_llama, batch.corrupted_tokens, g, record=True)
    gen = torch.Generator().manual_seed(3)
    for r in [g.logits_receiver, g.mlp_receiver(1), g.qkv_receiver(1, "v", 3), g.qkv_receiver(1, "k", 0),
              g.mlp_receiver(0), g.qkv_receiver(0, "q", 2)]:
        start = fwd.cols(fwd.stage_of(r)).start
        removed = (torch.rand(g.valid.shape, generator=gen) < 0.4) & g.valid
        removed[:, :start] = False
        senders = g.valid[:, r].nonzero().flatten().tolist()[:3]
        removed[senders, r] = False  # candidates are edges not removed yet
        cand = torch.zeros(len(senders), g.n_senders)
        for j, s in enumerate(senders):
            cand[j:, s] = 1.0
        cache = StageCache()
        out = fwd.evaluate(removed, r, cand, cache)
        assert torch.equal(fwd.evaluate(removed, r, cand, cache), out)  # second call reads the cache
        for j in range(len(senders)):
            trial = removed.clone()
            trial[senders[:j + 1], r] = True
            ref = graph_forward(tiny_llama, batch.clean_tokens, g, corrupted=corrupted, removed=trial)[0][:, -1]
            torch.testing.assert_close(out[j], ref, rtol=0, atol=1e-11)
            assert (ref - fwd.clean_last_logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="before the start stage"):
        fwd.evaluate(g.valid.clone(), g.logits_receiver)
    with pytest.raises(ValueError, match="already removed"):
        fwd.evaluate(g.valid.clone(), 0, torch.ones(1, g.n_senders))


def test_stage_costs_cover_the_stages_and_do_not_count_as_forwards(tiny_llama, batch):
    acdc = Acdc(tiny_llama, batch, AcdcConfig(speculation=3))
    before = acdc.forward.n_forward
    costs = stage_costs(acdc, n_points=4, repeats=1)
    assert acdc.forward.n_forward == before
    n_stages = acdc.forward.n_stages
    assert costs["stages"][0] == 0 and costs["stages"][-1] == n_stages - 1
    assert costs["stages_recomputed"] == [n_stages - t for t in costs["stages"]]
    assert costs["candidates_per_batch"] == 3 and all(s > 0 for s in costs["seconds_per_candidate"])


def test_depth_weighted_factor_by_hand(tiny_llama, batch):
    """Flat costs give the edge-count ratio; a cost equal to the stages recomputed gives the
    ratio of summed receiver depths, computed here edge by edge."""
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    acdc = Acdc(tiny_llama, batch)
    fwd = acdc.forward
    mask = EdgeRestriction.build(g, RestrictionConfig(last_layers=1)).mask
    flat = {"fit": {"intercept_seconds": 2.0, "seconds_per_stage": 0.0}, "seconds_per_candidate": [2.0]}
    assert depth_weighted_factor(flat, acdc, mask) == pytest.approx(g.n_edges / int(mask.sum()))
    linear = {"fit": {"intercept_seconds": 0.0, "seconds_per_stage": 1.0}, "seconds_per_candidate": [1.0]}
    depth = {r: fwd.n_stages - fwd.stage_of(r) for r in range(g.n_receivers)}
    full = sum(depth[r] for _, r in g.valid.nonzero().tolist())
    part = sum(depth[r] for _, r in mask.nonzero().tolist())
    assert depth_weighted_factor(linear, acdc, mask) == pytest.approx(full / part)
    assert full / part > g.n_edges / int(mask.sum())  # earlier receivers recompute more
    # a negative intercept would price the shallowest receivers below zero: floored at the
    # smallest measured cost
    negative = {"fit": {"intercept_seconds": -1.5, "seconds_per_stage": 1.0}, "seconds_per_candidate": [0.25, 3.0]}
    cost = {r: max(0.25, depth[r] - 1.5) for r in depth}
    assert min(depth.values()) - 1.5 < 0.25  # the floor is exercised
    full = sum(cost[r] for _, r in g.valid.nonzero().tolist())
    part = sum(cost[r] for _, r in mask.nonzero().tolist())
    assert depth_weighted_factor(negative, acdc, mask) == pytest.approx(full / part)


def test_first_receiver_layer_of_a_restriction():
    g = EdgeGraph(3, 2)
    assert EdgeRestriction.build(g, RestrictionConfig(last_layers=1)).first_receiver_layer == 2
    assert EdgeRestriction.build(g, RestrictionConfig(last_layers=2)).first_receiver_layer == 1
    assert EdgeRestriction.build(g, RestrictionConfig()).first_receiver_layer == 0
