"""SmolLM2 on hand-written IOI pairs: AP / IG-AP vs exact head patching; EAP-IG circuit is exact."""

from __future__ import annotations

import logging

import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from mechflow.attribution.gradients import attribution_patching, integrated_gradients_patching
from mechflow.attribution.patching import TokenPairs, exact_patching
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import CircuitEvaluator, prefix_mask, ranked_edges
from mechflow.circuits.result import tl_edge_patched_logits

log = logging.getLogger(__name__)

# (indirect object, subject, third name for the corrupted prompt, place, object)
IOI = [("Mary", "John", "Tom", "store", "a drink"), ("Alice", "Bob", "Kate", "park", "a ball"),
       ("Sarah", "David", "Paul", "school", "a book"), ("Anna", "Mark", "Lucy", "beach", "a towel"),
       ("Emma", "James", "Peter", "office", "a pen"), ("Laura", "Daniel", "Chris", "market", "an apple")]


def ioi_batch(lm) -> TokenPairs:
    clean = [f"When {io} and {s} went to the {p}, {s} gave {o} to" for io, s, _, p, o in IOI]
    corrupt = [f"When {io} and {s} went to the {p}, {c} gave {o} to" for io, s, c, p, o in IOI]

    def ids(name):
        return lm.tokenizer.encode(" " + name, add_special_tokens=False)

    good, bad = [ids(x[0]) for x in IOI], [ids(x[1]) for x in IOI]
    assert all(len(t) == 1 for t in good + bad), "names must be single tokens"
    good, bad = torch.tensor([t[0] for t in good]), torch.tensor([t[0] for t in bad])

    def metric(logits):
        rows = torch.arange(logits.shape[0])
        return logits[rows, -1, good] - logits[rows, -1, bad]

    return TokenPairs(lm.to_tokens(clean), lm.to_tokens(corrupt), metric)


@pytest.mark.slow
def test_ap_and_ig_track_exact_head_patching(smollm2):
    model, batch = smollm2.model, ioi_batch(smollm2)
    with torch.no_grad():
        ld = batch.metric(model(batch.clean_tokens))
    assert (ld > 0).all(), f"SmolLM2 should prefer the indirect object: {ld.tolist()}"
    layers = list(range(0, model.cfg.n_layers, 3))  # 90 of 270 heads: keeps the test to ~2 CPU-minutes
    exact = exact_patching(model, batch, "head", layers=layers)[layers].flatten().numpy()
    ap = attribution_patching(model, batch, "head")[layers].flatten().numpy()
    ig = integrated_gradients_patching(model, batch, "head", steps=5, layers=layers)[layers].flatten().numpy()
    stats = {name: (pearsonr(est, exact)[0], spearmanr(est, exact)[0]) for name, est in (("AP", ap), ("IG-AP", ig))}
    log.warning("head patching vs exact (pearson, spearman): %s", stats)
    print(f"\nhead scores vs exact patching (pearson, spearman): {stats}")
    assert stats["AP"][0] > 0.5 and stats["IG-AP"][0] > 0.5
    # IG should be at least as close as AP; reported above whatever the outcome
    assert stats["IG-AP"][0] >= stats["AP"][0] - 0.05


@pytest.mark.slow
def test_edge_circuit_evaluation_matches_tl_hooks_on_smollm2(smollm2):
    model, batch = smollm2.model, ioi_batch(smollm2)
    scores = edge_scores(model, batch, "eap-ig", steps=2)
    ev = CircuitEvaluator(model, batch)
    kept = prefix_mask(ranked_edges(scores, ev.graph), 1000, ev.graph)
    ours = ev.metric(kept)
    with torch.no_grad():
        ref = batch.metric(tl_edge_patched_logits(model, batch.clean_tokens, batch.corrupted_tokens,
                                                  ev.graph.valid & ~kept)).mean().item()
    assert ours == pytest.approx(ref, abs=2e-3 * max(1.0, abs(ref)))
    f = (ours - ev.m_empty) / (ev.m_full - ev.m_empty)
    print(f"\nSmolLM2 IOI: m(N)={ev.m_full:.3f} m(empty)={ev.m_empty:.3f} top-1000 EAP-IG edges f={f:.3f}")
