"""Renderers of a `ReportDocument`: PDF (reportlab platypus) and Markdown.

Both print the same content: title page with the completeness table, then Annex IV points 1-9 (legal
text, provider fields, measured evidence), then the appendices (evidence files with sha256, every
number with its field and file, reproducibility). A number is printed as its value followed by its
evidence id (``0.8064 [E12]``); in the PDF the id links to the evidence appendix entry, in Markdown
to its anchor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

from mechflow.contracts.report import Block, Number, ProviderField, ReportDocument
from mechflow.io import atomic_path, atomic_write_text
from mechflow.report import annex_iv

TOKEN = re.compile(r"\{N:([^{}]+)\}")
TO_BE_COMPLETED = "To be completed by the provider"


def resolve(s: str, numbers: Mapping[str, Number], *, cite: bool = True, link=None) -> str:
    """`s` with every ``{N:id}`` token replaced by the number's text (and ``[E#]`` when `cite`)."""

    def sub(m: re.Match) -> str:
        n = numbers[m.group(1)]
        if not cite:
            return n.text
        return link(n) if link else f"{n.text} [{n.evidence}]"

    return TOKEN.sub(sub, s)


def _measurements(doc: ReportDocument) -> str:
    sources = len({n.evidence for n in doc.numbers})
    return (f"{len(doc.numbers)} numbers read from {sources} files of the run (Appendix B); Appendix A lists "
            f"{len(doc.evidence)} evidence files (those and the run's figures, with sha256); "
            f"{len(doc.limitations)} findings cross a threshold of the report config and are listed as limitations "
            "in point 3.")


# ---------------------------------------------------------------------------------------------- Markdown


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: ReportDocument, path: Path) -> Path:
    numbers = {n.id: n for n in doc.numbers}
    figures = {f.id: f for f in doc.figures}
    fields = {f.key: f for f in doc.provider_fields}
    evidence = {e.id: e for e in doc.evidence}

    def r(s: str) -> str:
        return resolve(s, numbers, link=lambda n: f"{n.text} [[{n.evidence}]](#{n.evidence.lower()})")

    out = [f"# {doc.title}", "", f"**Model:** {doc.model} · **run:** {doc.run} · **config hash:** {doc.config_hash} · "
           f"**checked against:** `{doc.generated_from}`", "", f"> {doc.nature}", "",
           "## Completeness of the provider's part", "",
           f"{doc.completeness['provided']} of {doc.completeness['total']} provider fields provided, "
           f"{doc.completeness['to_be_completed']} to be completed by the provider "
           "(provider file: `report.provider_file`).", "",
           f"**Measurements:** {_measurements(doc)}", "", "| field | provider file key | Annex IV | status |",
           "|---|---|---|---|"]
    out += [f"| {f.label} | `{f.key}` | {', '.join(f.subpoints)} | {f.status} |" for f in doc.provider_fields]
    out += ["", f"Legal basis: {annex_iv.REGULATION}. {annex_iv.ANNEX_INTRO}", ""]
    for section in doc.sections:
        out += [f"## {section.heading}", ""]
        for point in section.subpoints:
            out += [f"### {point.id}", "", f"> *{point.legal_text}*", "", f"*Filled by: {point.filled_by}.*", ""]
            for block in point.blocks:
                out += _md_block(block, numbers, figures, fields, r, Path(path).parent)
    out += ["## Appendix A. Evidence files", "", "| id | file | sha256 | stage | in run manifest |",
            "|---|---|---|---|---|"]
    out += [f"| <a id=\"{e.id.lower()}\"></a>{e.id} | `{e.path}` | `{e.sha256}` | {e.stage} | "
            f"{'yes' if e.in_manifest else 'no'} |" for e in doc.evidence]
    out += ["", "## Appendix B. Every number and its source", "", "| id | quantity | value | field | file |",
            "|---|---|---|---|---|"]
    out += [f"| `{n.id}` | {_md_cell(n.label)} | {_md_cell(n.text)} | `{_md_cell(n.field)}` | "
            f"[{n.evidence}](#{n.evidence.lower()}) `{evidence[n.evidence].path}` |" for n in doc.numbers]
    rep = doc.reproducibility
    out += ["", "## Appendix C. Reproducibility", "", f"- config hash: `{rep.config_hash}`",
            f"- mechflow {rep.mechflow_version}, git commit `{rep.git_commit}` (uncommitted changes: {rep.git_dirty})",
            f"- Python {rep.python} on {rep.platform}", f"- model weights: `{rep.model_source}` sha256 "
            f"`{rep.model_sha256}`", f"- resolved config: `{rep.resolved_config}`",
            f"- run: {rep.started_at} to {rep.finished_at}", "", "Commands that regenerate this report:", "", "```"]
    out += rep.commands + ["```", "", "| package | version |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in sorted(rep.packages.items())]
    if "figures.dag" in figures:
        out += ["", "### The pipeline of this run", ""] + _md_block(Block(kind="figure", figure="figures.dag"), numbers,
                                                                    figures, fields, r, Path(path).parent)
    atomic_write_text(path, "\n".join(out) + "\n")
    return Path(path)


def _md_block(block: Block, numbers, figures, fields: Mapping[str, ProviderField], r, here: Path) -> list[str]:
    """Markdown lines of one block (`here`: the folder of report.md, for relative figure links)."""
    if block.kind == "provider":
        f = fields[block.provider_key]
        if f.value is None:
            return [f"- **{f.label}**: ⚠ **{TO_BE_COMPLETED}** (provider file key `{f.key}`)", ""]
        value = "; ".join(f.value) if isinstance(f.value, list) else f.value
        return [f"- **{f.label}** (provider): {value}", ""]
    if block.kind == "text":
        return [r(block.text or ""), ""]
    if block.kind == "numbers":
        lines = [f"**{block.title}**", ""] if block.title else []
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {_md_cell(numbers[i].label)} | {_md_cell(r('{N:' + i + '}'))} |" for i in block.numbers]
        return lines + [""]
    if block.kind == "table":
        lines = [f"**{block.title}**", ""] if block.title else []
        lines += ["| " + " | ".join(block.columns) + " |", "|" + "---|" * len(block.columns)]
        lines += ["| " + " | ".join(_md_cell(r(c)) for c in row) + " |" for row in block.rows]
        return lines + [""]
    if block.kind == "figure":
        f = figures[block.figure]
        return [f"![{f.caption}]({os.path.relpath(f.path, here)})", "", f"*{f.caption}* (`{f.path}`, [{f.evidence}]"
                f"(#{f.evidence.lower()}))", ""]
    raise ValueError(f"unknown block kind {block.kind}")


# ---------------------------------------------------------------------------------------------- PDF


def render_pdf(doc: ReportDocument, path: Path, resolved_config: str, cfg) -> Path:
    """``report.pdf`` with reportlab platypus: title page, table of contents (multiBuild), numbered
    sections with PDF outline, tables that split across pages with repeated headers, figures with
    captions, page numbers and document metadata."""
    from reportlab.lib import colors
    from reportlab.lib.enums import TA_CENTER
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.lib.utils import ImageReader
    from reportlab.platypus import (
        BaseDocTemplate,
        Frame,
        Image,
        KeepTogether,
        PageBreak,
        PageTemplate,
        Paragraph,
        Preformatted,
        Spacer,
        Table,
        TableStyle,
    )
    from reportlab.platypus.tableofcontents import TableOfContents

    base = getSampleStyleSheet()
    st = {
        "title": ParagraphStyle("ReportTitle", parent=base["Title"], fontSize=20, leading=25, spaceAfter=14),
        "sub": ParagraphStyle("Sub", parent=base["Normal"], fontSize=12, leading=16, alignment=TA_CENTER,
                              spaceAfter=6),
        "H1": ParagraphStyle("H1", parent=base["Heading1"], fontSize=15, leading=19, spaceBefore=6, spaceAfter=8,
                             keepWithNext=1),
        "toctitle": ParagraphStyle("TocTitle", parent=base["Heading1"], fontSize=15, leading=19, spaceAfter=8),
        "H2": ParagraphStyle("H2", parent=base["Heading2"], fontSize=12, leading=15, spaceBefore=10, spaceAfter=4,
                             keepWithNext=1),
        "body": ParagraphStyle("Body", parent=base["BodyText"], fontSize=9.5, leading=12.5, spaceAfter=5),
        "legal": ParagraphStyle("Legal", parent=base["BodyText"], fontName="Times-Italic", fontSize=9.5, leading=12,
                                leftIndent=10, textColor=colors.HexColor("#333333"), spaceAfter=4),
        "small": ParagraphStyle("Small", parent=base["BodyText"], fontSize=8, leading=10),
        "tabletitle": ParagraphStyle("TableTitle", parent=base["BodyText"], fontSize=8, leading=10, keepWithNext=1),
        "cell": ParagraphStyle("Cell", parent=base["BodyText"], fontSize=7.5, leading=9.2),
        "mono": ParagraphStyle("Mono", parent=base["BodyText"], fontName="Courier", fontSize=6.3, leading=7.8),
        "caption": ParagraphStyle("Caption", parent=base["BodyText"], fontSize=8.5, leading=11,
                                  textColor=colors.HexColor("#333333"), spaceAfter=8),
        "todo": ParagraphStyle("Todo", parent=base["BodyText"], fontSize=9, leading=11.5,
                               textColor=colors.HexColor("#7a4a00")),
    }
    numbers = {n.id: n for n in doc.numbers}
    figures = {f.id: f for f in doc.figures}
    fields = {f.key: f for f in doc.provider_fields}
    evidence = {e.id: e for e in doc.evidence}
    width = A4[0] - 4 * cm

    def r(s: str) -> str:
        return resolve(escape(s), numbers, link=lambda n: f'{escape(n.text)} <a href="#{n.evidence}" '
                       f'color="#1f5fa8"><super>[{n.evidence}]</super></a>')

    def P(s: str, style: str = "body") -> Paragraph:  # noqa: N802
        return Paragraph(s, st[style])

    grid = TableStyle([("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#999999")),
                       ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8ecf2")),
                       ("VALIGN", (0, 0), (-1, -1), "TOP"),
                       ("LEFTPADDING", (0, 0), (-1, -1), 3), ("RIGHTPADDING", (0, 0), (-1, -1), 3),
                       ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)])

    def table(columns: list[str], rows: list[list[str]], weights: list[float] | None = None,
              style: str = "cell", raw: bool = False) -> Table:
        if weights is None:
            lens = [max([len(c)] + [len(resolve(row[i], numbers, cite=False)) for row in rows]) for i, c in
                    enumerate(columns)]
            weights = [min(max(n, len(c) + 2, 6), 60) for n, c in zip(lens, columns)]
        total = sum(weights)
        data = [[P(f"<b>{escape(c)}</b>", "cell") for c in columns]]
        data += [[P(c if raw else r(c), style) for c in row] for row in rows]
        t = Table(data, colWidths=[width * w / total for w in weights], repeatRows=1, hAlign="LEFT")
        t.setStyle(grid)
        return t

    def figure(fig_id: str) -> list:
        f = figures[fig_id]
        iw, ih = ImageReader(f.path).getSize()
        w = min(cfg.figure_width_cm * cm, width)
        h = w * ih / iw
        if h > 18 * cm:
            w, h = w * 18 * cm / h, 18 * cm
        n = list(figures).index(fig_id) + 1
        return [KeepTogether([Image(f.path, width=w, height=h),
                              P(f"<b>Figure {n}.</b> {escape(f.caption)} <font face='Courier' size='7'>"
                                f"{escape(f.path)}</font> <a href='#{f.evidence}' color='#1f5fa8'>"
                                f"<super>[{f.evidence}]</super></a>", "caption")])]

    def block(b: Block) -> list:
        if b.kind == "provider":
            f = fields[b.provider_key]
            if f.value is None:
                t = Table([[P(f"<b>{TO_BE_COMPLETED.upper()}</b>: {escape(f.label)} "
                              f"<font face='Courier' size='8'>(provider file key {f.key})</font>", "todo")]],
                          colWidths=[width], hAlign="LEFT")
                t.setStyle(TableStyle([("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fff3cd")),
                                       ("BOX", (0, 0), (-1, -1), 0.6, colors.HexColor("#d39e00"))]))
                return [t, Spacer(1, 4)]
            value = "; ".join(f.value) if isinstance(f.value, list) else f.value
            return [P(f"<b>{escape(f.label)}</b> (stated by the provider): {escape(value)}")]
        if b.kind == "text":
            return [P(r(b.text or ""))]
        if b.kind == "numbers":
            out = [P(f"<b>{escape(b.title)}</b>", "tabletitle")] if b.title else []
            rows = [[numbers[i].label, "{N:" + i + "}"] for i in b.numbers]
            return out + [table(["quantity", "value"], rows, [4, 5]), Spacer(1, 6)]
        if b.kind == "table":
            out = [P(f"<b>{escape(b.title)}</b>", "tabletitle")] if b.title else []
            return out + [table(b.columns, b.rows), Spacer(1, 6)]
        if b.kind == "figure":
            return figure(b.figure)
        raise ValueError(f"unknown block kind {b.kind}")

    class ReportTemplate(BaseDocTemplate):
        def afterFlowable(self, flowable):  # noqa: N802 (reportlab's hook)
            if isinstance(flowable, Paragraph) and flowable.style.name in ("H1", "H2"):
                level = 0 if flowable.style.name == "H1" else 1
                label = flowable.getPlainText()
                key = f"h{self.seq.nextf('heading')}"
                self.canv.bookmarkPage(key)
                self.canv.addOutlineEntry(label, key, level=level, closed=level > 0)
                self.notify("TOCEntry", (level, label, self.page, key))

    def decorate(canvas, d):
        canvas.saveState()
        canvas.setFont("Helvetica", 7.5)
        canvas.setFillColor(colors.HexColor("#555555"))
        canvas.drawString(2 * cm, 1.2 * cm, f"Annex IV technical evidence: {doc.model}, run {doc.run}, config "
                          f"{doc.config_hash}. Not a conformity assessment.")
        canvas.drawRightString(A4[0] - 2 * cm, 1.2 * cm, f"Page {d.page}")
        canvas.restoreState()

    story: list = [Spacer(1, 3 * cm), P(escape(doc.title), "title"),
                   P(f"Model <b>{escape(doc.model)}</b> · run <b>{escape(doc.run)}</b>", "sub"),
                   P(f"config hash {doc.config_hash} · mechflow {escape(doc.reproducibility.mechflow_version)} · "
                     f"commit {escape(str(doc.reproducibility.git_commit))[:12]}", "sub"),
                   P(f"run finished {escape(doc.reproducibility.finished_at)}", "sub"), Spacer(1, 1 * cm),
                   P("<b>What this document is.</b> " + escape(doc.nature)), Spacer(1, 0.4 * cm),
                   P(f"<b>Legal basis.</b> {escape(annex_iv.REGULATION)}. {escape(annex_iv.ANNEX_INTRO)}"),
                   Spacer(1, 0.4 * cm),
                   P(f"<b>Completeness of the provider's part:</b> {doc.completeness['provided']} of "
                     f"{doc.completeness['total']} provider fields provided; {doc.completeness['to_be_completed']} "
                     f"to be completed by the provider (provider file: <font face='Courier'>report.provider_file"
                     "</font>)."),
                   P(f"<b>Measurements:</b> {_measurements(doc)}"),
                   table(["provider field", "key", "Annex IV", "status"],
                         [[escape(f.label), escape(f.key), ", ".join(f.subpoints), f.status]
                          for f in doc.provider_fields], [8, 5, 2, 4], raw=True),
                   PageBreak()]
    toc = TableOfContents()
    toc.levelStyles = [ParagraphStyle("TOC1", fontSize=10, leading=13, leftIndent=10, firstLineIndent=-10),
                       ParagraphStyle("TOC2", fontSize=8.5, leading=10.5, leftIndent=26, firstLineIndent=-10)]
    story += [P("Contents", "toctitle"), toc, PageBreak()]
    for section in doc.sections:
        story.append(P(escape(section.heading), "H1"))
        for point in section.subpoints:
            if len(section.subpoints) > 1:
                story.append(P(f"Annex IV {point.id}", "H2"))
            story += [P(escape(point.legal_text), "legal"),
                      P(f"<i>Filled by: {escape(point.filled_by)}.</i>", "small"), Spacer(1, 3)]
            for b in point.blocks:
                story += block(b)
        story.append(Spacer(1, 8))
    story += [PageBreak(), P("Appendix A. Evidence files", "H1"),
              P("Every file the report cites, with its sha256 (checked against the run manifest where it records "
                "the file: a changed file makes the report stage refuse).")]
    rows = [[f'<a name="{e.id}"/>{e.id}', escape(e.path), e.sha256, escape(e.stage), "yes" if e.in_manifest else "no"]
            for e in doc.evidence]
    story += [table(["id", "file", "sha256", "stage", "in manifest"], rows, [2, 8, 17.5, 3, 2.5], "mono", raw=True),
              PageBreak(), P("Appendix B. Every number and its source", "H1"),
              P("Each number of the report: its key in report.json, the value as read, and where it was read.")]
    rows = [[escape(n.id), escape(n.label), escape(n.text), escape(n.field),
             f"{n.evidence} {escape(evidence[n.evidence].path)}"] for n in doc.numbers]
    story += [table(["key", "quantity", "value", "field", "file"], rows, [6, 6, 5, 4, 6], "mono", raw=True),
              PageBreak(), P("Appendix C. Reproducibility", "H1")]
    rep = doc.reproducibility
    story += [table(["item", "value"], [[k, escape(str(v))] for k, v in (
        ("config hash", rep.config_hash), ("mechflow", rep.mechflow_version), ("git commit", rep.git_commit),
        ("uncommitted changes", rep.git_dirty), ("Python", rep.python), ("platform", rep.platform),
        ("model weights", rep.model_source), ("model sha256", rep.model_sha256),
        ("resolved config", rep.resolved_config), ("run started", rep.started_at), ("run finished", rep.finished_at))],
        [4, 14], raw=True), Spacer(1, 6), P("<b>Commands that regenerate this report</b>", "small")]
    story += [Preformatted(c, st["mono"], maxLineLength=125) for c in rep.commands]
    story += [Spacer(1, 6), table(["package", "version"], [[k, escape(v)] for k, v in sorted(rep.packages.items())],
                                  [6, 6], raw=True)]
    if "figures.dag" in figures:  # heading and figure on one page
        story += [KeepTogether([P("The pipeline of this run", "H2"), *figure("figures.dag")])]
    if resolved_config:
        story += [PageBreak(), P("Resolved configuration of the run", "H2"),
                  Preformatted(resolved_config, st["mono"], maxLineLength=125)]

    with atomic_path(path) as tmp:
        template = ReportTemplate(str(tmp), pagesize=A4, leftMargin=2 * cm, rightMargin=2 * cm, topMargin=1.8 * cm,
                                  bottomMargin=1.8 * cm, title=doc.title, author="mechflow (evidence); the provider "
                                  "(provider fields)", subject=f"EU AI Act Annex IV technical evidence: {doc.model}",
                                  keywords=["EU AI Act", "Annex IV", "interpretability", doc.model, doc.config_hash],
                                  creator="mechflow report stage (reportlab platypus)",
                                  invariant=1)  # no timestamps or random ids: the same run gives the same bytes
        frame = Frame(template.leftMargin, template.bottomMargin, template.width, template.height, id="body")
        template.addPageTemplates([PageTemplate(id="page", frames=[frame], onPage=decorate)])
        template.multiBuild(story)
    return Path(path)
