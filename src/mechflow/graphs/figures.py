"""Static figures of the graph stage: the pruned graph (PNG, the viewer's layout) and the
validation scatter (predicted vs real change of the answer logit)."""

from __future__ import annotations

from pathlib import Path

from mechflow.contracts.graphs import NeuronpediaGraph
from mechflow.plotting import save_figure

COLORS = {"cross layer transcoder": "#4e79a7", "mlp reconstruction error": "#bab0ac", "embedding": "#59a14f",
          "logit": "#f28e2b"}
# Neuronpedia's feature_type names (circuit-tracer calls every transcoder "cross layer transcoder") -> legend
LABELS = {"cross layer transcoder": "transcoder feature", "mlp reconstruction error": "error node (MLP)",
          "embedding": "token embedding", "logit": "logit"}
# Links drawn in the static PNG: a full-size pruned graph has ~10^5 links, a hairball at any alpha; the
# strongest ones show the structure (the viewer draws more: MAX_DRAWN_LINKS in mechflow.graphs.viewer).
MAX_STATIC_LINKS = 1500


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    save_figure(fig, path, dpi=130, bbox_inches="tight")


def layout_positions(doc: NeuronpediaGraph) -> dict[str, tuple[float, float]]:
    """(x, y) per node: x = token position (nodes of one cell spread sideways), y = layer
    (embeddings 0, layer l at l + 1, logits on top)."""
    n_layers = max((int(n.layer) - 1 for n in doc.nodes if n.feature_type == "logit"), default=0)
    cells: dict[tuple[int, int], list] = {}
    for n in doc.nodes:
        row = 0 if n.feature_type == "embedding" else n_layers + 1 if n.feature_type == "logit" else int(n.layer) + 1
        cells.setdefault((row, n.ctx_idx), []).append(n)
    pos = {}
    logits = [n for n in doc.nodes if n.feature_type == "logit"]
    last = len(doc.metadata.prompt_tokens) - 1
    for i, n in enumerate(logits):  # one row, right-aligned under the last position, a column apart
        pos[n.node_id] = (max(0.0, last - (len(logits) - 1 - i) * min(1.0, last / max(1, len(logits) - 1))),
                          n_layers + 1)
    for (row, ctx), nodes in cells.items():
        if nodes[0].feature_type == "logit":
            continue
        k = len(nodes)
        for i, n in enumerate(nodes):
            pos[n.node_id] = (ctx + (0 if k == 1 else -0.35 + 0.7 * i / (k - 1)), row)
    return pos


def plot_graph(doc: NeuronpediaGraph, path: Path, title: str = "", max_links: int = MAX_STATIC_LINKS) -> Path:
    """The pruned graph in the viewer's layout; only the `max_links` strongest links (|weight|) are drawn,
    strongest on top, and the title says how many of how many."""
    plt = _plt()
    pos = layout_positions(doc)
    n_pos = len(doc.metadata.prompt_tokens)
    n_rows = max(y for _, y in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * n_pos), max(4, 0.28 * n_rows + 2)))
    drawn = sorted(doc.links, key=lambda link: abs(link.weight))[-max_links:] if max_links else []
    wmax = max((abs(link.weight) for link in drawn), default=1.0) or 1.0
    for link in drawn:
        (x0, y0), (x1, y1) = pos[link.source], pos[link.target]
        ax.plot([x0, x1], [y0, y1], color="#1f77b4" if link.weight >= 0 else "#d62728",
                alpha=0.15 + 0.6 * abs(link.weight) / wmax, linewidth=0.3 + 2 * abs(link.weight) / wmax, zorder=1)
    for kind, color in COLORS.items():
        pts = [pos[n.node_id] for n in doc.nodes if n.feature_type == kind]
        if pts:
            marker = {"cross layer transcoder": "o", "mlp reconstruction error": "s"}.get(kind, "D")
            ax.scatter(*zip(*pts, strict=True), s=22, c=color, marker=marker, edgecolors="#333", linewidths=0.4,
                       zorder=2, label=LABELS[kind])
    for n in doc.nodes:
        if n.feature_type == "logit":
            x, y = pos[n.node_id]
            ax.annotate(n.clerp.replace("Output ", ""), (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="left", fontsize=6, rotation=60)
    ax.set_xticks(range(n_pos))
    ax.set_xticklabels(doc.metadata.prompt_tokens, rotation=45, ha="right", fontsize=7)
    ticks = [0, *range(1, n_rows - 1, 5), n_rows - 1]
    ax.set_yticks(ticks)
    ax.set_yticklabels(["emb", *(f"L{t - 1}" for t in ticks[1:-1]), "logits"])
    ax.set_ylabel("layer")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    shown = f"{len(drawn)} strongest of {len(doc.links)} links" if len(drawn) < len(doc.links) else \
        f"{len(doc.links)} links"
    ax.set_title(f"{title or doc.metadata.slug} ({shown})", fontsize=9, pad=48)  # room for the logit labels
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_validation(rows: list[dict], path: Path, title: str = "") -> Path:
    """Predicted vs measured change of the answer logit, one marker per operation: the real model on
    the top features, the real model on the top features outside the excluded positions (when that
    set was validated), and the frozen replacement (all rows; exact by construction)."""
    plt = _plt()
    panels = [("predicted_graph", "real", "real model, top features", "top")]
    if any(r.get("selection") == "excluding_positions" for r in rows):
        panels.append(("predicted_graph", "real", "real model, away from excluded positions", "excluding_positions"))
    panels.append(("predicted_direct", "frozen", "frozen replacement", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    markers = {"zero": "o", "x2": "^", "x-1": "v", "x1.1": "+", "x0.9": "x"}
    for ax, (pred, real, label, selection) in zip(axes[0], panels, strict=True):
        chosen = [r for r in rows if selection is None or r.get("selection", "top") == selection]
        for op, marker in markers.items():
            pts = [(r[pred], r[real]) for r in chosen if r["operation"] == op]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=16, marker=marker, label=op)
        values = [v for r in chosen for v in (r[pred], r[real])]
        if values:
            lo, hi = min(values), max(values)
            ax.plot([lo, hi], [lo, hi], color="#999", linewidth=0.8)
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel(f"{pred.replace('_', ' ')} Δ answer logit")
        ax.set_ylabel(f"{real} Δ answer logit")
    if not rows:
        axes[0][0].text(0.5, 0.5, "no interventions (graph.validation_features: 0)", ha="center",
                        transform=axes[0][0].transAxes)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)
