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

MAX_DRAWN_LINKS = 20_000  # SVG paths a browser draws fluently; full-size SmolLM2 graphs keep 280-430k links


def _asset(name: str) -> str:
    return resources.files("mechflow.graphs").joinpath("viewer", name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    """JSON that cannot close the <script> element it is inlined in."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def render_viewer(graph: NeuronpediaGraph, *, features: dict[str, Any] | None = None, title: str | None = None,
                  scores: dict[str, float] | None = None, max_drawn_links: int = MAX_DRAWN_LINKS) -> str:
    """The viewer page of ``graph``. ``features`` maps ``"{layer}_{feature}"`` to
    ``{"top_contexts": [{"left": [...], "token": str, "right": [...], "activation": float}],
    "logit_effects": {"top": [{"token", "value"}], "bottom": [...]}}``; ``scores`` holds the
    pruned graph's ``replacement`` and ``completeness``. The page draws the ``max_drawn_links``
    strongest links (|weight|) and says so; every link stays in the embedded JSON (hover lists)."""
    payload = {"graph": graph.model_dump(mode="json"), "features": features or {},
               "title": title or graph.metadata.slug, "scores": scores, "max_drawn_links": max_drawn_links}
    page = _asset("viewer.html")
    html_title = (title or graph.metadata.slug).replace("&", "&amp;").replace("<", "&lt;")
    return (page.replace("__TITLE__", html_title).replace("__CSS__", _asset("viewer.css"))
            .replace("__JS__", _asset("viewer.js"))
            .replace("__DATA__", _script_safe(json.dumps(payload, ensure_ascii=False))))


def write_viewer(path: str | Path, graph: NeuronpediaGraph, **kwargs: Any) -> Path:
    return atomic_write_text(path, render_viewer(graph, **kwargs))


def main(argv: list[str] | None = None) -> None:
    """Re-render a viewer from a graph's frontend JSON, e.g. after editing its ``supernodes.json``:

        python -m mechflow.graphs.viewer results/<run>/graphs/ioi/ioi-p0.json \\
            --supernodes results/<run>/graphs/ioi/p0/supernodes.json --out viewer.html
    """
    import argparse

    from mechflow.contracts.documents import load_document, read_document
    from mechflow.contracts.graphs import SupernodesDocument

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    ap.add_argument("graph", type=Path, help="the frontend JSON (<task>-p<N>.json)")
    ap.add_argument("--supernodes", type=Path, default=None, help="an (edited) supernodes.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    doc = read_document(args.graph, NeuronpediaGraph, fix="pass the <task>-p<N>.json of rule attribution_graph")
    if args.supernodes is not None:
        groups = load_document(args.supernodes, SupernodesDocument, fix="each entry is [label, node_id, ...]")
        ids = {n.node_id for n in doc.nodes}
        unknown = sorted({i for g in groups["supernodes"] for i in g[1:]} - ids)
        if unknown:
            from mechflow.errors import DataError

            raise DataError(f"{args.supernodes}: node ids {unknown[:5]} are not nodes of {args.graph}; "
                            "use the node_id values of the graph's nodes")
        doc = doc.model_copy(update={"qParams": doc.qParams.model_copy(update={"supernodes": groups["supernodes"]})})
    write_viewer(args.out, doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
