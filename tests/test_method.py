"""docs/METHOD.md against the code: every name its tables give for the code is defined in the module
the row names (a core row: in the core), every test it cites exists, every repository path and
`--flag` it names is there. A renamed function or test leaves a stale name: it fails here."""

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
METHOD = (ROOT / "docs" / "METHOD.md").read_text()
CORE = sorted((ROOT / "dit360" / "core").glob("*.py"))
TICKS = re.compile(r"`([^`]+)`")
NAME = re.compile(r"\.?[A-Za-z_]\w*(\.\w+)*")  # `flow_loss`, `Grid.wrap_mask`, `.crop`
OURS = ("core/", "dit360/", "tests/")  # the other paths are the reference's or FLUX's


def local(path: str) -> Path | None:
    """Our file a METHOD path names (`core/x.py` is dit360/core/x.py), None for another repo's."""
    if path.startswith("core/"):
        return ROOT / "dit360" / path
    return ROOT / path if path.startswith(OURS) or (ROOT / path).is_file() else None


@cache
def defined(path: Path) -> frozenset[str]:
    """What a module defines or imports: functions, classes, assignments (class fields and `self.x`
    included), function parameters (a seam is often one), imported names."""
    names = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.FunctionDef | ast.ClassDef):
            names.add(n.name)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.Name | ast.Attribute) and isinstance(n.ctx, ast.Store):
            names.add(n.id if isinstance(n, ast.Name) else n.attr)
        elif isinstance(n, ast.ImportFrom):
            names |= {a.asname or a.name for a in n.names}
    return frozenset(names)


def table_cells() -> list[tuple[int, int, str]]:
    """(line, column, text) of every code and test cell of METHOD's tables (the first column, what
    the row is about, is prose)."""
    cells = []
    for i, line in enumerate(METHOD.splitlines(), 1):
        if line.startswith("|") and not set(line) <= set("|- "):
            cols = line.strip("|").split("|")
            cells += [(i, c, text) for c, text in enumerate(cols) if c > 0]
    return cells


def code_names() -> list[tuple[str, str, tuple[str, ...]]]:
    """(where, name, files) for each name a code cell gives; a cell without a file takes the one
    above it in its column. Test cells are left to `test_names`; headers have no names."""
    found, above = [], {}
    for line, col, text in table_cells():
        ticks = TICKS.findall(text)
        files = tuple(t for t in ticks if t.endswith(".py") and local(t))
        if any(t.startswith("tests/") for t in ticks) or not ticks:
            continue
        files = above[col] = files or above.get(col, ())
        found += [(f"METHOD.md:{line}", t, files) for t in ticks if NAME.fullmatch(t)]
    return [f for f in found if not f[1].endswith(".py")]


def resolves(name: str, files: tuple[str, ...]) -> bool:
    """A name (its last part, `Adapter.multiplier`'s `multiplier`) defined in one of the files or,
    for a core file, anywhere in the core (the method's one namespace)."""
    paths = {local(f) for f in files}
    if any(f.startswith("core/") for f in files):
        paths |= set(CORE)
    last = name.split(".")[-1]
    return all(any(part in defined(p) for p in paths) for part in {name.split(".")[0], last} - {""})


CODE = code_names()


def test_tables_name_code():
    """The parse finds the tables' names (an empty list would pass everything below)."""
    names = {n for _, n, _ in CODE}
    assert {"Flux", "Grid.pack", ".crop", "invert", "flow_loss", "attention_backend"} <= names
    assert len(CODE) > 60


@pytest.mark.parametrize(("where", "name", "files"), CODE, ids=[f"{w}:{n}" for w, n, _ in CODE])
def test_code_names_resolve(where, name, files):
    """Each function, class or attribute a table gives is defined where its row says."""
    assert files, f"{where}: `{name}` has no module in its column"
    assert resolves(name, files), f"{where}: `{name}` is not defined in {', '.join(files)}"


def test_names_that_do_not_exist_fail():
    """The check is able to fail: a stale name, a name of another module than the row's."""
    assert not resolves("denoise_v2", ("core/sampling.py",))
    assert not resolves("Grid.wrap_rows", ("core/grid.py",))
    assert not resolves("flow_loss", ("dit360/memory/ahead.py",))
    assert resolves("Grid.wrap_mask", ("core/grid.py",)) and resolves("attend", ("core/layers.py",))


def test_tests_exist():
    """`tests/x.py::name` and each `::name` after it (in its cell or, after "the same", the cells
    below), each one test of that file."""
    tests, file = [], None
    for line, _, text in table_cells():
        for t in TICKS.findall(text):
            if t.startswith("tests/"):
                file, _, name = t.partition("::")
            elif t.startswith("::"):
                name = t[2:]
            else:
                continue
            if name:
                tests.append((line, file, name))
    assert len(tests) > 30
    for line, file, name in tests:
        assert name in defined(ROOT / file), f"METHOD.md:{line}: no {file}::{name}"


def test_paths_and_flags_exist():
    """Each of our paths METHOD names is there; each `--flag` is one of the commands' options."""
    ticks = TICKS.findall(METHOD)
    paths = [t.split("::")[0].split(" ")[0] for t in ticks if t.split("::")[0].endswith(".py")]
    assert [p for p in paths if local(p) and not local(p).is_file()] == []
    sources = [*ROOT.glob("*.py"), *(ROOT / "dit360").rglob("*.py")]
    fields = set().union(*(defined(p) for p in sources))  # an options dataclass's fields
    nodes = [n for p in sources for n in ast.walk(ast.parse(p.read_text()))]
    given = {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    flags = {f for t in ticks for f in re.findall(r"--[a-z][\w-]*", t)}
    missing = {f for f in flags if f not in given and f[2:].replace("-", "_") not in fields}
    assert flags and missing == set()
