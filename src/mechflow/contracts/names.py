"""MIB component names (Mueller et al. 2025), the names every file uses for model components.

Nodes: ``input`` (the embeddings), ``a{L}.h{h}`` (attention head h of layer L), ``m{L}`` (the MLP
of layer L), ``logits``. A head is read through three receivers, ``a{L}.h{h}<q>``, ``<k>`` and
``<v>``; an edge is ``"{sender}->{receiver}"``, e.g. ``a0.h1->a3.h2<v>``. Layers and heads count
from 0. Node-level tables (``node_scores.parquet``, ``head_types.parquet``) name heads and MLPs
the same way; their ``kind`` column is ``head`` / ``mlp``.
"""

from __future__ import annotations

INPUT = "input"
LOGITS = "logits"
QKV = ("q", "k", "v")  # head receivers, in receiver order
EDGE_SEPARATOR = "->"
KINDS = ("input", "head", "mlp")  # node kinds of `node_kind`


def head_name(layer: int, head: int) -> str:
    """``a{layer}.h{head}``."""
    return f"a{layer}.h{head}"


def mlp_name(layer: int) -> str:
    """``m{layer}``."""
    return f"m{layer}"


def head_input_name(layer: int, head: int, kind: str) -> str:
    """``a{layer}.h{head}<{kind}>`` for kind in q, k, v (a head's query/key/value input)."""
    return f"a{layer}.h{head}<{kind}>"


def component_name(kind: str, layer: int, head: int) -> str:
    """A node-table component: ``a{layer}.h{head}`` for kind ``head``, else ``m{layer}``."""
    return head_name(layer, head) if kind == "head" else mlp_name(layer)


def node_kind(name: str) -> tuple[str, int, int]:
    """(kind, layer, head) of a node name: input -> ("input", -1, -1), a3.h1 -> ("head", 3, 1), m4 -> ("mlp", 4, -1)."""
    if name == INPUT:
        return "input", -1, -1
    if name.startswith("a"):
        layer, head = name[1:].split(".h")
        return "head", int(layer), int(head)
    return "mlp", int(name[1:]), -1


def receiver_node(receiver: str) -> str:
    """The node a receiver belongs to: ``a3.h1<q>`` -> ``a3.h1`` (other receivers are nodes)."""
    return receiver.split("<")[0]


def edge_name(sender: str, receiver: str) -> str:
    """``{sender}->{receiver}``."""
    return f"{sender}{EDGE_SEPARATOR}{receiver}"


def split_edge(name: str) -> tuple[str, str]:
    """(sender, receiver) of an edge name (receiver empty when there is no ``->``)."""
    sender, _, receiver = name.partition(EDGE_SEPARATOR)
    return sender, receiver


def sender_names(n_layers: int, n_heads: int) -> list[str]:
    """Every sender in graph order: input, then per layer its heads and its MLP."""
    names = [INPUT]
    for L in range(n_layers):
        names += [head_name(L, h) for h in range(n_heads)] + [mlp_name(L)]
    return names


def receiver_names(n_layers: int, n_heads: int) -> list[str]:
    """Every receiver in graph order: per layer the q, k, v inputs of its heads and its MLP, then logits."""
    names = []
    for L in range(n_layers):
        for kind in QKV:
            names += [head_input_name(L, h, kind) for h in range(n_heads)]
        names.append(mlp_name(L))
    return names + [LOGITS]
