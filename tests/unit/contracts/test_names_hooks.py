"""MIB component names and the TransformerLens hook vocabulary."""

from __future__ import annotations

import pytest

from mechflow.contracts import hooks, names


def test_graph_names_come_from_the_contract():
    from mechflow.circuits.graph import EdgeGraph

    g = EdgeGraph(2, 2)
    assert g.sender_names == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    assert g.receiver_names[:7] == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0"]
    assert g.receiver_names[-1] == names.LOGITS
    s, r = g.edge_index("a0.h1->a1.h0<v>")
    assert g.edge_name(s, r) == names.edge_name("a0.h1", "a1.h0<v>") == "a0.h1->a1.h0<v>"
    assert names.split_edge("input->logits") == ("input", "logits")


@pytest.mark.parametrize("name, kind", [("input", ("input", -1, -1)), ("a3.h11", ("head", 3, 11)),
                                        ("m4", ("mlp", 4, -1))])
def test_node_kind_parses_what_the_formatters_write(name, kind):
    assert names.node_kind(name) == kind
    if kind[0] != "input":
        assert names.component_name(*kind) == name
    assert names.receiver_node(names.head_input_name(3, 11, "k")) == names.head_name(3, 11)


def test_hook_points_expand_layer_major():
    assert hooks.expand_hook_points([0, 2], ["resid_post", "mlp_in"]) == [
        "blocks.0.hook_resid_post", "blocks.0.ln2.hook_normalized", "blocks.2.hook_resid_post",
        "blocks.2.ln2.hook_normalized"]
    assert hooks.selected_hooks([1], ["mlp_out", "mlp_out"], ["hook_embed", "blocks.1.hook_mlp_out"]) == [
        "blocks.1.hook_mlp_out", "hook_embed"]
    assert hooks.hook_layer("blocks.12.attn.hook_z") == 12 and hooks.hook_layer("ln_final.hook_normalized") is None
    assert hooks.block_hook(3, hooks.COMPONENT_HOOKS["head"]) == "blocks.3.attn.hook_z"
    with pytest.raises(KeyError):
        hooks.expand_hook_points([0], ["residual"])


def test_copies_outside_the_contracts_agree_until_they_import_it():
    """harvest/config.py still holds its own HOOK_POINTS (its owner replaces it with an import)."""
    from mechflow.harvest import config

    assert getattr(config, "HOOK_POINTS", hooks.HOOK_POINTS) == hooks.HOOK_POINTS
