"""The package's layers (README, Layout) import only downward: core, memory, speed, load, app,
train, in that order; a module imports its own folder and those before it, never one after."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parent.parent / "dit360"
ORDER = ["core", "memory", "speed", "load", "app", "train"]
MODULES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py")


def imported_layers(source: str, layer: str) -> list[str]:
    """The layers (folders of dit360) a module of `layer` imports, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.append(layer)
        elif isinstance(node, ast.ImportFrom) and node.level == 2:
            found += [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dit360."):
            found.append(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1] for a in node.names if a.name.startswith("dit360.")]
    return found


def test_every_module_is_in_a_layer():
    """No module sits loose in dit360/: each is in one of the layers' folders."""
    assert MODULES and {p.parent.name for p in MODULES} == set(ORDER)
    assert {p.name for p in PKG.glob("*.py")} == {"__init__.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_layers_import_only_downward(path):
    """A module imports nothing of a layer after its own."""
    own = ORDER.index(path.parent.name)
    found = imported_layers(path.read_text(), path.parent.name)
    upward = [x for x in found if ORDER.index(x) > own]
    assert upward == [], f"{path.relative_to(PKG)} imports {upward}"


def test_the_layer_check_catches_an_upward_import():
    """The check sees relative, parent-relative and absolute imports of later layers."""
    src = "from .offload import lent\nfrom ..app.options import fail\nfrom ..core import grid\n"
    src += "from .. import train\nimport dit360.load.files\nfrom dit360.app import report\n"
    assert imported_layers(src, "memory") == ["memory", "app", "core", "train", "load", "app"]
