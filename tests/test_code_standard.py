"""The standard the library code is held to: its layers import only the layers below them,
passes never import each other, and no function is longer than a screen."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60

# Each layer may import the layers before it in this list, never those after it.
LAYERS = ("ir", "algorithms", "passes", "top")


def _layer(path: Path) -> str:
    """The layer of a library file, by the module it is imported as."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    module = ".".join(("mergec", *parts) if parts[0] == "passes" else parts)
    return _module_layer(module) or "top"


def _module_layer(module: str) -> str | None:
    """The layer of an imported mergec module, or None for anything else."""
    if module.startswith("mergec.passes"):
        return "passes"
    if module.startswith("mergec.algorithms"):
        return "algorithms"
    if module.startswith("mergec.ir") or module == "mergec.errors":
        return "ir"
    if module == "mergec" or module.startswith("mergec."):
        return "top"
    return None


def _library_files() -> list[Path]:
    return sorted([*ROOT.joinpath("mergec").rglob("*.py"), *ROOT.joinpath("passes").glob("*.py")])


def _runtime_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """Modules imported outside ``if TYPE_CHECKING:`` blocks, with their line numbers."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    result = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            result.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            result.extend((alias.name, node.lineno) for alias in node.names)
    return result


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_module_imports_only_the_layers_below_it(path: Path) -> None:
    layer = _layer(path)
    tree = ast.parse(path.read_text())
    for module, line in _runtime_imports(tree):
        imported = _module_layer(module)
        if imported is None:
            continue
        where = f"{path.relative_to(ROOT)}:{line} imports {module}"
        assert LAYERS.index(imported) <= LAYERS.index(layer), where
        if layer == "passes" and path.name != "__init__.py":
            assert imported != "passes", f"{where}: passes do not import each other"


def test_no_library_function_is_longer_than_a_screen() -> None:
    long = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_rule_table_in_the_architecture_notes_lists_every_rule() -> None:
    from mergec.passes.annotate_units import RULES

    expected: dict[str, set[str]] = {}
    for op, rule in RULES.items():
        expected.setdefault(rule.__name__, set()).add(op)
    text = ROOT.joinpath("docs", "architecture.md").read_text()
    table = text.split("### The rule table", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            documented[cells[0].strip("`")] = {op.strip() for op in cells[1].split(",")}
    assert documented == expected


# Imported only inside the functions that need them, each named by an extra of pyproject.toml.
OPTIONAL = ("mergec_lab", "matplotlib", "sklearn", "torchvision", "transformers")


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_library_imports_no_optional_dependency_at_module_level(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                 else [alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [])
        for name in names:
            assert name.split(".")[0] not in OPTIONAL, \
                f"{path.relative_to(ROOT)}:{node.lineno} imports {name} at module level"


def test_a_missing_extra_is_named() -> None:
    from mergec.errors import MergecError, require_extra

    with pytest.raises(MergecError, match=r"pip install 'mergec\[plots\]'"):
        require_extra("mergec_no_such_module", "plots", "MergeReport.plot")


def test_a_merge_imports_no_optional_dependency() -> None:
    """The core install (torch, networkx, numpy, scipy, safetensors, tqdm) is all a merge
    needs."""
    import subprocess
    import sys

    code = """
import sys, torch
from torch import nn
import mergec
torch.manual_seed(0)
make = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
x = torch.randn(32, 4)
result = mergec.merge(make(), make(), x[:4], [(x,)], progress=False)
result.report.to_json()
print(sorted(m for m in sys.modules if m.split(".")[0] in %r))
""" % (OPTIONAL,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
