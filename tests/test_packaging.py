"""What `pip install .` ships: the wheel holds only the packages and package data that
pyproject.toml's [tool.setuptools] lists by hand, so each folder of dit360/ with modules and each
non-.py file in it must be listed there; checked against the tree (no build: test_view.py builds
a wheel with pip)."""

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def read_toml(text: str) -> dict:
    """pyproject.toml's tables: tomllib's (Python 3.11+), else `read_toml_lines`'."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (requires-python) has no TOML reader
        return read_toml_lines(text)
    return tomllib.loads(text)


def read_toml_lines(text: str) -> dict:
    """The one-line `key = value` entries of each [table], nested as tomllib nests them; a value
    that is no Python literal (a multi-line array, true, an inline table) is left out."""
    tables: dict = {}
    table = tables
    for line in text.splitlines():
        if head := re.fullmatch(r"\[([\w.-]+)\]\s*(#.*)?", line):
            table = tables
            for part in head[1].split("."):
                table = table.setdefault(part, {})
        elif entry := re.fullmatch(r'("?)([\w.-]+)\1\s*=\s*(.+?)\s*(#.*)?', line):
            try:
                table[entry[2]] = ast.literal_eval(entry[3])
            except (ValueError, SyntaxError):
                pass  # not one of the string or list-of-strings entries read here
    return tables


def unshipped(pyproject: str, root: Path) -> list[str]:
    """What a wheel built from `pyproject` leaves out of root/dit360 (subpackages not in
    `packages`, files no package-data pattern matches), and listed packages that do not exist."""
    setup = read_toml(pyproject)["tool"]["setuptools"]
    listed, data = set(setup["packages"]), setup.get("package-data", {})
    files = [
        p.relative_to(root)
        for p in (root / "dit360").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    ]
    found = {".".join(p.parent.parts) for p in files if p.suffix == ".py"}
    out = [f"{name}: a package not in [tool.setuptools] packages" for name in found - listed]
    out += [f"{name}: in [tool.setuptools] packages, but no package" for name in listed - found]
    for path in (p for p in files if p.suffix != ".py"):
        parents = [".".join(path.parts[:i]) for i in range(len(path.parts) - 1, 0, -1)]
        owner = next((name for name in parents if name in found), "")  # the nearest package
        rel = "/".join(path.parts[owner.count(".") + 1 :])
        patterns = [*data.get(owner, []), *data.get("*", []), *data.get("", [])]
        if not any(fnmatch.fnmatch(rel, pattern) for pattern in patterns):
            out.append(f"{path}: in no [tool.setuptools.package-data] pattern of {owner}")
    return sorted(out)


def test_the_wheel_lists_every_package_and_file():
    """Our pyproject.toml lists each subpackage of dit360/ and each non-.py file (viewer.html)."""
    assert unshipped((ROOT / "pyproject.toml").read_text(), ROOT) == []


def test_the_check_sees_a_dropped_package_or_file(tmp_path):
    """A copy of our pyproject.toml without dit360.memory, or without viewer.html, is caught."""
    text = (ROOT / "pyproject.toml").read_text()
    drops = {'"dit360.memory", ': "dit360.memory:", '"viewer.html"': "viewer.html:"}
    for drop, named in drops.items():
        assert drop in text
        assert [named in line for line in unshipped(text.replace(drop, ""), ROOT)] == [True]


def test_the_310_reader_reads_what_tomllib_reads():
    """On Python 3.10, without tomllib, the fallback reads our setuptools tables as tomllib does."""
    import tomllib  # Python 3.11+, where this suite runs

    text = (ROOT / "pyproject.toml").read_text()
    assert read_toml_lines(text)["tool"]["setuptools"] == tomllib.loads(text)["tool"]["setuptools"]
    assert read_toml_lines(text)["project"]["requires-python"] == ">=3.10"
