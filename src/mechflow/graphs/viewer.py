"""A self-contained offline HTML viewer of a pruned attribution graph.

One file, no CDN or network: the graph JSON (the Neuronpedia / circuit-tracer frontend schema,
`mechflow.contracts.graphs`), the per-feature details and the viewer's JS and CSS (shipped in
``mechflow/graphs/viewer/``) are inlined. The graph is drawn as SVG laid out by layer (rows;
embeddings at the bottom, logits at the top) × token position (columns); node size follows each
node's own share of influence on the logits (differences of the pruning's cumulative scores);
features, error nodes, embeddings and logits have distinct shapes and colours; hovering a node
highlights its links and shows its activation, influence, strongest inputs and, for a feature,
its top activating contexts and logit effects.

Written by hand rather than embedding Neuronpedia's frontend (a Next.js app that needs a server and
its feature database) so the file opens from disk anywhere.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from mechflow.contracts.graphs import NeuronpediaGraph
from mechflow.io import atomic_write_text


def _asset(name: str) -> str:
    return resources.files("mechflow.graphs").joinpath("viewer", name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    """JSON that cannot close the <script> element it is inlined in."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def render_viewer(graph: NeuronpediaGraph, *, features: dict[str, Any] | None = None, title: str | None = None,
                  scores: dict[str, float] | None = None) -> str:
    """The viewer page of ``graph``. ``features`` maps ``"{layer}_{feature}"`` to
    ``{"top_contexts": [{"left": [...], "token": str, "right": [...], "activation": float}],
    "logit_effects": {"top": [{"token", "value"}], "bottom": [...]}}``; ``scores`` holds the
    pruned graph's ``replacement`` and ``completeness``."""
    payload = {"graph": graph.model_dump(mode="json"), "features": features or {},
               "title": title or graph.metadata.slug, "scores": scores}
    page = _asset("viewer.html")
    html_title = (title or graph.metadata.slug).replace("&", "&amp;").replace("<", "&lt;")
    return (page.replace("__TITLE__", html_title).replace("__CSS__", _asset("viewer.css"))
            .replace("__JS__", _asset("viewer.js"))
            .replace("__DATA__", _script_safe(json.dumps(payload, ensure_ascii=False))))


def write_viewer(path: str | Path, graph: NeuronpediaGraph, **kwargs: Any) -> Path:
    return atomic_write_text(path, render_viewer(graph, **kwargs))
