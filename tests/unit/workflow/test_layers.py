"""The layering of ../shared/ARCHITECTURE.md, enforced on the source tree (static: reads the imports).

- No library module imports `mechflow.workflow` (the Snakemake glue sits above every stage).
- The bottom layer (`models`, `contracts`, `io`, `errors`, `config`) imports no stage package.
- No module imports another module's private (`_name`) names or a `_private` module.
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


def private_imports(path: Path, text: str | None = None) -> list[str]:
    """`from mechflow.x import _name` (or from a `_private` module) in `path`, other than its own module."""
    own = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mechflow")):
            continue
        if any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
            found.append(f"{node.module} (a private module)")
        if node.module != own:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules():
    """A name with a leading underscore is private to its module: a second module that needs it gets
    a public name (ARCHITECTURE.md: no private names across modules)."""
    offenders = {str(p.relative_to(SRC)): bad for p in sorted(SRC.rglob("*.py")) if (bad := private_imports(p))}
    assert offenders == {}


def test_the_private_import_check_finds_names_and_modules():
    stage = SRC / "stats" / "stage.py"
    text = ("from mechflow.stats.output import _hidden, public\n"
            "from mechflow.stats._impl import f\n"
            "from mechflow.stats.stage import _own_name\n")  # its own module: allowed
    assert private_imports(stage, text) == ["mechflow.stats.output._hidden", "mechflow.stats._impl (a private module)"]
