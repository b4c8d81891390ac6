"""The MIB edge graph of a transformer (Mueller et al. 2025 "MIB"; Hanna et al. 2024 EAP-IG).

Nodes: ``input``, ``a{L}.h{h}``, ``m{L}``, ``logits``. Receivers of a head are ``a{L}.h{h}<q>``,
``<k>``, ``<v>``; for grouped-query attention every QUERY head gets its own q, k and v receiver
(as MIB does). Edge names: ``"{sender}->{receiver}"``. The names are the contract's
(`mechflow.contracts.names`).

Index layout (dense ``[n_senders, n_receivers]`` matrices hold scores and masks):

* senders: 0 = input; layer L occupies ``1 + L (H+1) + h`` for head h and ``1 + L (H+1) + H``
  for its MLP.
* receivers: layer L occupies ``L (3H+1) + j``: ``j in [0, H)`` q of head j, ``[H, 2H)`` k,
  ``[2H, 3H)`` v, ``3H`` the MLP input; the last receiver is the logits.
* an edge exists iff the sender precedes the receiver: heads of layer L read senders
  ``< 1 + L (H+1)``; the MLP of layer L also reads layer L's heads; logits read every sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from mechflow.contracts import names as mib


@dataclass(frozen=True)
class EdgeGraph:
    """Index bookkeeping for the edge graph of a model with ``n_layers`` x ``n_heads`` heads."""

    n_layers: int
    n_heads: int

    @classmethod
    def from_cfg(cls, cfg) -> EdgeGraph:
        """From a TransformerLens config (or anything with ``n_layers`` and ``n_heads``)."""
        return cls(int(cfg.n_layers), int(cfg.n_heads))

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def first_sender(self, layer: int) -> int:
        """Index of head 0 of ``layer``; also the number of senders a head of ``layer`` reads."""
        return 1 + layer * (self.n_heads + 1)

    def head_sender(self, layer: int, head: int) -> int:
        return self.first_sender(layer) + head

    def mlp_sender(self, layer: int) -> int:
        return self.first_sender(layer) + self.n_heads

    def first_receiver(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1)

    def qkv_receiver(self, layer: int, kind: str, head: int) -> int:
        return self.first_receiver(layer) + "qkv".index(kind) * self.n_heads + head

    def mlp_receiver(self, layer: int) -> int:
        return self.first_receiver(layer) + 3 * self.n_heads

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    @cached_property
    def sender_names(self) -> list[str]:
        return mib.sender_names(self.n_layers, self.n_heads)

    @cached_property
    def receiver_names(self) -> list[str]:
        return mib.receiver_names(self.n_layers, self.n_heads)

    @cached_property
    def n_readable(self) -> Tensor:
        """``[n_receivers]`` number of senders each receiver reads (a prefix of the sender order)."""
        out = torch.empty(self.n_receivers, dtype=torch.long)
        for L in range(self.n_layers):
            r0 = self.first_receiver(L)
            out[r0:r0 + 3 * self.n_heads] = self.first_sender(L)
            out[self.mlp_receiver(L)] = self.first_sender(L) + self.n_heads
        out[-1] = self.n_senders
        return out

    @cached_property
    def valid(self) -> Tensor:
        """``[n_senders, n_receivers]`` bool: which (sender, receiver) pairs are edges."""
        return torch.arange(self.n_senders)[:, None] < self.n_readable[None, :]

    @property
    def n_edges(self) -> int:
        """Closed form: sum over receivers of the senders they read."""
        H, L = self.n_heads, self.n_layers
        per_layer = sum(3 * H * (1 + l * (H + 1)) + (1 + l * (H + 1) + H) for l in range(L))
        return per_layer + self.n_senders

    def edge_name(self, sender: int, receiver: int) -> str:
        return mib.edge_name(self.sender_names[sender], self.receiver_names[receiver])

    def edge_index(self, name: str) -> tuple[int, int]:
        """Inverse of `edge_name`; raises KeyError for a name that is not an edge of this graph."""
        s_name, r_name = mib.split_edge(name)
        s, r = self._sender_lookup[s_name], self._receiver_lookup[r_name]
        if not bool(self.valid[s, r]):
            raise KeyError(f"{name!r} is not an edge: the sender does not precede the receiver")
        return s, r

    @cached_property
    def _sender_lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.sender_names)}

    @cached_property
    def _receiver_lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.receiver_names)}

    def edge_names(self, mask: Tensor) -> list[str]:
        """Names of the edges set in a ``[n_senders, n_receivers]`` bool mask (row-major order)."""
        idx = (mask & self.valid).nonzero().tolist()
        return [self.edge_name(s, r) for s, r in idx]

    def mask_from_names(self, names: list[str]) -> Tensor:
        mask = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for name in names:
            mask[self.edge_index(name)] = True
        return mask

    def nodes_of(self, mask: Tensor) -> list[str]:
        """Nodes touched by the edges in ``mask`` (head receivers map to their head node)."""
        mask = mask & self.valid
        nodes = {self.sender_names[s] for s in mask.any(1).nonzero().flatten().tolist()}
        for r in mask.any(0).nonzero().flatten().tolist():
            nodes.add(mib.receiver_node(self.receiver_names[r]))
        order = {n: i for i, n in enumerate(self.sender_names + [mib.LOGITS])}
        return sorted(nodes, key=order.__getitem__)
