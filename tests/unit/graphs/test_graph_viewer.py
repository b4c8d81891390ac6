"""The offline HTML viewer in a real browser: headless Chromium loads the file, the SVG it draws
has exactly the JSON's nodes and links, and a screenshot is saved (kept in MECHFLOW_SCREENSHOT_DIR
when set, for a person to look at)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from mechflow.graphs.export import neuronpedia_graph, supernodes
from mechflow.graphs.influence import graph_scores, prune_graph
from mechflow.graphs.viewer import render_viewer, write_viewer


def tiny_document(tiny_graph):
    transcoders, graph = tiny_graph.transcoders, tiny_graph.graph
    pruned = prune_graph(graph.adjacency, graph.layout, graph.logit_probabilities)
    groups = supernodes(graph, pruned, lambda layer, f: transcoders.transcoders[layer].W_dec[f], min_cosine=0.3)
    doc = neuronpedia_graph(graph, pruned, slug="tiny-0", scan="tiny", transcoder_list=[], prompt="tiny prompt",
                            decode=lambda t: f"tok{t}", node_threshold=0.8, supernodes=groups)
    feature = next(n for n in doc.nodes if n.feature_type == "cross layer transcoder")
    layer, f, _ = feature.node_id.split("_")
    features = {f"{layer}_{f}": {"top_contexts": [{"left": ["a", " b"], "token": " </script>", "right": [" c"],
                                                    "activation": 1.5}],
                                 "logit_effects": {"top": [{"token": "x", "value": 0.5}], "bottom": []}}}
    rep, comp = graph_scores(graph.adjacency, graph.layout, graph.logit_probabilities)
    return doc, features, {"replacement": rep, "completeness": comp}


def test_the_page_is_self_contained(tiny_graph):
    doc, features, scores = tiny_document(tiny_graph)
    html = render_viewer(doc, features=features, scores=scores)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from a network
    assert "<script src" not in html and "<link" not in html
    assert html.count("</script>") == 2  # a "</script>" inside the data cannot end the data element


def test_chromium_draws_every_node_and_link(chromium, tmp_path, tiny_graph):
    doc, features, scores = tiny_document(tiny_graph)
    page = write_viewer(tmp_path / "graph.html", doc, features=features, scores=scores)
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
            "--window-size=1400,900"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'id="graph-svg"' in dom, "the viewer's script did not run"
    drawn = re.findall(r'data-node-id="([^"]+)"', dom)
    assert sorted(drawn) == sorted(n.node_id for n in doc.nodes)
    assert len(re.findall(r'<path class="link ', dom)) == len(doc.links)
    assert f'data-node-count="{len(doc.nodes)}"' in dom
    assert "top activating contexts" not in dom or features  # side panel is filled by hovering (logit by default)
    shot = tmp_path / "graph.png"
    subprocess.run([*args, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    capped = write_viewer(tmp_path / "capped.html", doc, features=features, scores=scores, max_drawn_links=5)
    dom = subprocess.run([*args, "--dump-dom", capped.as_uri()], capture_output=True, text=True, timeout=120).stdout
    weights = sorted((abs(float(w)) for w in re.findall(r'<path class="link [a-z]+" d="[^"]+" stroke-width="([0-9.]+)"',
                                                         dom)), reverse=True)
    assert len(weights) == 5 and f'data-link-count="{len(doc.links)}"' in dom  # the 5 strongest drawn, all counted
    assert "the 5 strongest drawn" in dom
    keep = os.environ.get("MECHFLOW_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "graph_viewer_tiny.png")


def test_an_edited_supernodes_file_re_renders_the_viewer(tiny_graph, tmp_path):
    import json

    import pytest

    from mechflow.errors import DataError
    from mechflow.graphs.export import write_graph_json
    from mechflow.graphs.viewer import main

    doc, _, _ = tiny_document(tiny_graph)
    graph = write_graph_json(tmp_path / "g.json", doc)
    features = [n.node_id for n in doc.nodes if n.feature_type == "cross layer transcoder"][:2]
    edited = tmp_path / "supernodes.json"
    edited.write_text(json.dumps({"slug": "tiny-0", "min_cosine": 0.7, "supernodes": [["my group", *features]]}))
    main([str(graph), "--supernodes", str(edited), "--out", str(tmp_path / "v.html")])
    assert '"my group"' in (tmp_path / "v.html").read_text()
    edited.write_text(json.dumps({"slug": "tiny-0", "min_cosine": 0.7, "supernodes": [["x", "9_9_9"]]}))
    with pytest.raises(DataError, match="9_9_9"):
        main([str(graph), "--supernodes", str(edited), "--out", str(tmp_path / "v2.html")])


def test_static_figure_draws_the_strongest_links(tiny_graph, tmp_path):
    """graph.png draws at most `max_links` links, the strongest, and its title says how many of how many."""
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    import matplotlib.axes

    from mechflow.graphs.figures import plot_graph

    doc, _, _ = tiny_document(tiny_graph)
    k = max(1, len(doc.links) // 3)
    drawn, titles = [], []
    real_plot, real_title = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.set_title

    def plot(self, *args, **kwargs):
        drawn.append(kwargs.get("linewidth"))
        return real_plot(self, *args, **kwargs)

    def set_title(self, label, *args, **kwargs):
        titles.append(label)
        return real_title(self, label, *args, **kwargs)

    with mock.patch.object(matplotlib.axes.Axes, "plot", plot), \
            mock.patch.object(matplotlib.axes.Axes, "set_title", set_title):
        plot_graph(doc, tmp_path / "graph.png", title="tiny", max_links=k)
    assert len(drawn) == k < len(doc.links)
    assert titles == [f"tiny ({k} strongest of {len(doc.links)} links)"]
    assert max(drawn) == 2.3  # the strongest link is among those drawn (width 0.3 + 2 |w| / max |w|)
    assert (tmp_path / "graph.png").stat().st_size > 1000
