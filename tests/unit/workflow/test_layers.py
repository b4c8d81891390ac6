"""The layering of ../shared/ARCHITECTURE.md, enforced on the source tree (static: reads the imports).

- No library module imports `mechflow.workflow` (the Snakemake glue sits above every stage).
- The bottom layer (`models`, `contracts`, `io`, `errors`, `config`) imports no stage package.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "src" / "mechflow"
BOTTOM = ("contracts", "io", "errors")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def package_of(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def test_no_library_module_imports_the_workflow_package():
    offenders = [f"{p.relative_to(SRC)} imports {m}" for p in SRC.rglob("*.py") if package_of(p) != "workflow"
                 for m in sorted(imported_modules(p)) if m == "mechflow.workflow" or m.startswith("mechflow.workflow.")]
    assert not offenders, offenders


def test_the_bottom_layer_imports_no_stage_package():
    allowed = {"mechflow", *(f"mechflow.{b}" for b in BOTTOM)}
    offenders = []
    for p in SRC.rglob("*.py"):
        if package_of(p) not in BOTTOM or p.name == "export.py":  # export is a tool: it reads every config model
            continue
        for m in imported_modules(p):
            if m.startswith("mechflow.") and not any(m == a or m.startswith(a + ".") for a in allowed - {"mechflow"}) \
                    and m != "mechflow.__version__":
                offenders.append(f"{p.relative_to(SRC)} imports {m}")
    assert not offenders, offenders
