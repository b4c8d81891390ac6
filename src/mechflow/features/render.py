"""Step 6 of the `features` stage, for people: `histograms.png` and one self-contained `features.html`.

The page holds the summary, the task attribution tables and one card per latent; every text is
escaped and the figure is inlined, so the file can be opened anywhere.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mechflow.features.stats import HIST_LOG10_HI, HIST_LOG10_LO, N_HIST_BINS, FeatureStats
from mechflow.plotting import save_figure


def plot_histograms(stats: FeatureStats, features: Sequence[int], path: Path, title: str) -> None:
    """Firing frequency over latents, pooled activation values, and a few latents' own distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(HIST_LOG10_LO, HIST_LOG10_HI, N_HIST_BINS + 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    freq = stats.frequency.numpy()
    live = freq > 0
    ax = axes[0]
    if live.any():
        ax.hist(np.log10(freq[live]), bins=40, color="tab:blue")
    ax.set_title(f"firing frequency ({int((~live).sum())} of {len(freq)} latents never fire)")
    ax.set_xlabel("log10 fraction of tokens")
    ax.set_ylabel("latents")
    pooled = stats.hist.sum(0).numpy()
    axes[1].stairs(pooled, edges, fill=True, color="tab:orange")
    axes[1].set_title(f"activation values (non-zero, {stats.n_tokens:,} tokens)")
    axes[1].set_xlabel("log10 activation")
    axes[1].set_ylabel("count")
    for f in list(features)[:6]:
        counts = stats.hist[f].numpy()
        if counts.sum():
            axes[2].stairs(counts / counts.sum(), edges, label=f"#{f}")
    axes[2].set_title("activation distribution of recorded latents")
    axes[2].set_xlabel("log10 activation")
    axes[2].set_ylabel("fraction of firings")
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=8)
    filled = np.nonzero(pooled)[0]
    if len(filled):  # show the populated decades only
        lo, hi = edges[max(filled[0] - 2, 0)], edges[min(filled[-1] + 3, N_HIST_BINS)]
        axes[1].set_xlim(lo, hi)
        axes[2].set_xlim(lo, hi)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _e(text: Any) -> str:
    """HTML-escaped text with newlines and tabs made visible (token strings)."""
    return html.escape(str(text), quote=True).replace("\n", "\u21b5").replace("\t", "\u21e5")


def _num(v: Any, fmt: str = ".4g") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _svg_hist(counts: Sequence[int], width: int = 160, height: int = 36) -> str:
    total = max(max(counts), 1)
    bw = width / len(counts)
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{height - height * c / total:.1f}" width="{bw:.1f}" '
                   f'height="{height * c / total:.1f}"/>' for i, c in enumerate(counts) if c)
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="log10 activation histogram">{bars}</svg>')


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
.feat{border:1px solid #bbb;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:12px}
mark{background:#fc6;font-weight:bold}.pos{color:#060}.neg{color:#a00}
.tok{font-family:ui-monospace,monospace;background:#f3f3f3;padding:0 2px;margin:1px;white-space:pre}
svg.hist rect{fill:#4a7ab5}.muted{color:#777;font-size:12px}
"""


def render_html(records: Sequence[dict[str, Any]], summary: dict[str, Any], figure_png: bytes | None) -> str:
    """One self-contained page: summary, task attribution tables, one card per latent (all text escaped)."""
    s = summary
    kind = s.get("dictionary_kind", "SAE")  # the transcoder set's page: "transcoder", one card per (layer, feature)
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(kind)} features: {_e(s['hook'])}</title>"
             f"<style>{_CSS}</style></head><body>"),
             f"<h1>{_e(kind)} features · {_e(s['model'])} · {_e(s['hook'])}</h1>",
             (f"<p>{_e(s['architecture'])} {_e(kind)}, d_in {s['d_in']}, d_sae {s['d_sae']} "
             f"(<code>{_e(s['dictionary'])}</code>). "
             f"Statistics over {s['n_tokens']:,} {_e(s.get('token_source', 'harvest'))} tokens; {s['n_live']} latents "
             f"fire, {s['n_dead']} never do. "
             f"{len(records)} latents recorded.</p>")]
    if figure_png:
        parts.append(f"<img alt='activation histograms' style='max-width:100%' "
                     f"src='data:image/png;base64,{base64.b64encode(figure_png).decode()}'>")
    for t in s["tasks"]:
        parts.append(f"<h2>Task attribution: {_e(t['task'])}</h2>")
        if "skipped" in t:
            parts.append(f"<p>skipped: {_e(t['skipped'])}</p>")
            continue
        parts.append(f"<p>{t['n_prompts']} prompt pairs, metric {_e(t['metric'])}: model {_num(t['m_model'])}, "
                     f"spliced {_num(t['m_spliced'])}, corrupted {_num(t['m_corrupted'])}. Attribution = "
                     f"(a<sub>clean</sub> − a<sub>{_e(t['ablation'])}</sub>) · ∂m/∂a; exact effect = "
                     f"m(spliced) − m(latent patched), error term {'kept' if t['error_term'] else 'dropped'}.</p>")
        ag = t.get("agreement")
        if ag:
            joint = t["joint"]
            parts.append(f"<table><tr><th>verified</th><th>Pearson</th><th>Spearman</th><th>sign agreement</th>"
                         f"<th>max |error|</th><th>joint: Σ attribution</th><th>joint: exact</th></tr><tr>"
                         f"<td>{ag['n']}</td><td>{_num(ag.get('pearson'), '.3f')}</td>"
                         f"<td>{_num(ag.get('spearman'), '.3f')}</td><td>{_num(ag['sign_agreement'], '.2f')}</td>"
                         f"<td>{_num(ag['max_abs_error'])}</td><td>{_num(joint['sum_attribution'])}</td>"
                         f"<td>{_num(joint['exact_effect'])}</td></tr></table>")
            rows = "".join(f"<tr><td><a href='#f{r['feature']}'>#{r['feature']}</a></td>"
                           f"<td>{_num(r['attribution'])}</td><td>{_num(r['exact_effect'])}</td></tr>"
                           for r in t["top"])
            parts.append(f"<table><tr><th>latent</th><th>attribution</th><th>exact effect</th></tr>{rows}</table>")
    parts.append("<h2>Latents</h2>")
    for rec in records:
        st = rec["stats"]
        per_layer = s.get("dictionary_kind") == "transcoder"  # cards of several layers: name the layer
        label = f"L{rec['layer']} #{rec['feature']}" if per_layer else f"#{rec['feature']}"
        anchor = f"f{rec['layer']}_{rec['feature']}" if per_layer else f"f{rec['feature']}"
        parts.append(f"<div class='feat' id='{anchor}'><h3>{label}</h3>"
                     f"<p>fires on {_num(100 * st['frequency'], '.3g')}% of tokens ({st['n_active']:,}); mean when "
                     f"active {_num(st['mean_active'])}, max {_num(st['max'])} {_svg_hist(st['hist']['counts'])}"
                     f"<span class='muted'> log10 activation {st['hist']['log10_lo']:g}…{st['hist']['log10_hi']:g}"
                     "</span></p>")
        if rec["task_attribution"]:
            items = "; ".join(f"{_e(t)}: {_num(v['attribution'])} (rank {v['rank']}"
                              + (f", exact {_num(v['exact_effect'])}" if v["verified"] else "") + ")"
                              for t, v in rec["task_attribution"].items())
            parts.append(f"<p>task attribution — {items}</p>")
        if rec["logit_effects"]:
            for kind, cls in (("promoted", "pos"), ("suppressed", "neg")):
                toks = "".join(f"<span class='tok' title='{_num(x['value'])}'>{_e(x['token'])}</span>"
                               for x in rec["logit_effects"][kind])
                parts.append(f"<p><span class='{cls}'>{kind}</span>: {toks}</p>")
        if rec["top_contexts"]:
            rows = "".join(f"<tr><td>{_num(c['activation'])}</td><td class='ctx'>{_e(''.join(c['left']))}"
                           f"<mark>{_e(c['token'])}</mark>{_e(''.join(c['right']))}</td></tr>"
                           for c in rec["top_contexts"])
            parts.append(f"<table><tr><th>activation</th><th>context</th></tr>{rows}</table>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
