"""The README against the code: every command line's flags parse with its script's own parser (no
model loaded) and every `--flag` it names is one of its scripts' flags; every `from dit360...`
import and dotted name resolves; the Python API's layer table lists every module, with names and
signatures that exist; every relative link, anchor and repository path is there."""

import argparse
import ast
import importlib
import inspect
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)
CWD = {"runs.py": "benchmarks"}  # "The paired row, from `benchmarks/`"
NO_PARSER = {"runs.py": "one JSON argument", "tests/scene.py": "the screenshot's path"}


def command_lines() -> list[list[str]]:
    """Every `python ...` / `torchrun ...` command of the README, in its shell blocks or inline, as
    argv (from the script or `-m module` on); `pip`, `pytest` and other programs are left out."""
    lines = [
        ln
        for lang, body in BLOCKS
        if lang == "bash"
        for ln in body.replace("\\\n", " ").split("\n")
    ]
    lines += [c.replace("\n", " ") for c in re.findall(r"`((?:python|torchrun) [^`]+)`", README)]
    found = []
    for line in lines:
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            if words[:1] == ["torchrun"]:  # its own flags, then the script
                words = words[next(i for i, w in enumerate(words) if w.endswith(".py")) :]
            elif words[:1] == ["python"] and (words[1] != "-m" or "dit360." in words[2]):
                words = words[1:]
            else:
                continue
            found.append(words)
    return found


COMMANDS = command_lines()  # also bare mentions, "`python benchmarks/memory.py`, about 3 minutes"
RUNS = [w for w in COMMANDS if w[2 if w[0] == "-m" else 1 :]]  # the command lines with arguments


class Parsed(Exception):
    """Raised by the patched `parse_args` once a parser accepted the command line."""


def entry(namespace: dict, source: str) -> str:
    """The function a script's last `if __name__ == "__main__":` block runs (`run_main(main)`:
    main; the block's imports are run into `namespace`); the earlier one of the scripts only
    installs the signal handlers, as the `-m` modules' first lines do."""
    mains = [
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)
    ]
    imports = [n for n in mains[-1].body if isinstance(n, ast.Import | ast.ImportFrom)]
    exec(compile(ast.Module(imports, []), "<main block>", "exec"), namespace)
    calls = [
        c for c in ast.walk(mains[-1]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
    ]
    ran = next((c.args[0].id for c in calls if c.func.id == "run_main"), None)
    return ran or calls[0].func.id


def script_namespace(words: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[dict, str, list]:
    """The script's (or `-m` module's) globals, its source and its arguments, loaded without
    running its `__main__` block."""
    if words[0] == "-m":
        module = importlib.import_module(words[1])
        return vars(module), inspect.getsource(module), words[2:]
    path = ROOT / CWD.get(words[0], "") / words[0]
    assert path.is_file(), f"README runs {words[0]}, which is not in the repository"
    monkeypatch.setattr(sys, "path", [*sys.path])  # restored after: scripts add folders to it
    monkeypatch.syspath_prepend(str(path.parent))  # as `python path` puts its folder first
    namespace = runpy.run_path(str(path), run_name=f"readme_{path.stem}")
    return namespace, path.read_text(), words[1:]


def test_commands_found():
    """The extraction sees every script the README runs (a change in its fences fails here)."""
    scripts = {w[0] if w[0] != "-m" else w[1] for w in COMMANDS}
    expected = {"sample.py", "edit.py", "train.py", "convert_weights.py", "prepare.py"}
    assert expected | {"dit360.app.view", "dit360.app.evaluate"} <= scripts


@pytest.mark.parametrize("words", RUNS, ids=lambda w: shlex.join(w)[:70])
def test_command_line_parses(words, monkeypatch, capsys, tmp_path):
    """The script's own parser accepts the README's command line (stopped right after parsing)."""
    if words[0] in NO_PARSER:  # no flags: check the one argument instead
        assert len(words) == 2, f"{words[0]} takes {NO_PARSER[words[0]]}"
        assert (ROOT / CWD.get(words[0], "") / words[0]).is_file()
        if words[0] == "runs.py":  # the JSON names a kind, and its keys are that run's arguments
            args = json.loads(words[1])
            namespace, _, _ = script_namespace(words, monkeypatch)
            inspect.signature(namespace["KINDS"][args.pop("kind")]).bind(**args)
        return
    namespace, source, args = script_namespace(words, monkeypatch)
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [words[0], *args])
    monkeypatch.chdir(tmp_path)  # nothing a parser might touch lands in the repository
    with pytest.raises(SystemExit if "--help" in args else Parsed) as raised:
        try:
            namespace[entry(namespace, source)]()
        except SystemExit as e:
            if e.code == 0 and "--help" in args:
                raise
            pytest.fail(f"{shlex.join(words)}: exit {e.code}: {capsys.readouterr().err.strip()}")
    assert raised.type is Parsed or "usage:" in capsys.readouterr().out  # --help printed it


# Flags of other programs the README runs (pip, torchrun, hf, farm-bench)
FOREIGN = {
    "--index-url",
    "--nproc_per_node",
    "--repo-type",
    "--include",
    "--timeout",
    "--vs",
    "--no-deps",
}


def parsers(monkeypatch: pytest.MonkeyPatch) -> list[argparse.ArgumentParser]:
    """The parser of each script and module the README's command lines run."""
    found = []

    def keep_and_stop(self, args=None, namespace=None):
        found.append(self)
        raise Parsed

    for words in {tuple(w[:2] if w[0] == "-m" else w[:1]) for w in COMMANDS} - {
        (k,) for k in NO_PARSER
    }:
        namespace, source, _ = script_namespace(list(words), monkeypatch)
        with monkeypatch.context() as m:
            m.setattr(argparse.ArgumentParser, "parse_args", keep_and_stop)
            m.setattr(sys, "argv", [words[0]])
            with pytest.raises(Parsed):
                namespace[entry(namespace, source)]()
    return found


def test_every_flag_named_exists(monkeypatch):
    """Every `--flag` the README names, in prose, tables or commands, is one of our scripts' flags
    (the ones it runs) or of the other programs it runs."""
    ours = {o for p in parsers(monkeypatch) for a in p._actions for o in a.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*[a-z0-9](?![\w*-])", README))
    assert sorted(named - ours - FOREIGN) == []


def python_blocks() -> list[str]:
    """The README's Python snippets."""
    return [body for lang, body in BLOCKS if lang == "python"]


def test_python_snippets_import():
    """Each snippet compiles and its `from dit360... import ...` lines import as written."""
    assert python_blocks()
    for body in python_blocks():
        tree = ast.parse(body)
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module.startswith("dit360"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def resolve(dotted: str) -> object:
    """`dit360.a.b.Name` as an object: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("dotted", sorted(set(re.findall(r"`(dit360(?:\.\w+)+)", README))))
def test_dotted_names_resolve(dotted):
    """Every `dit360.x.y` the README names (in prose or a command) is a module or an attribute."""
    resolve(dotted)


def layer_table() -> dict[str, dict[str, str]]:
    """The Python API's layer table: {layer: {module: its description}}."""
    table, rows = {}, README.split("| layer | module: what it owns |")[1].split("\n\n")[0]
    for layer, cell in re.findall(r"^\| `(\w+)`[^|]* \| (.+) \|$", rows, re.M):
        modules, depth, piece = {}, 0, ""
        for ch in cell + ";":  # split on the semicolons outside parentheses
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == ";" and depth == 0:
                m = re.fullmatch(r"\s*`(\w+)`(?:: (.*))?", piece, re.S)
                if m:
                    modules[m.group(1)] = m.group(2) or ""
                else:  # a note on the module before it, e.g. its `python -m` command
                    last = list(modules)[-1]
                    modules[last] += ";" + piece
                piece = ""
            else:
                piece += ch
        table[layer] = modules
    return table


def test_layer_table_lists_every_module():
    """The table has the six layers, and each module of a layer's folder (or its `-m` command)."""
    table = layer_table()
    assert list(table) == ["core", "memory", "speed", "load", "app", "train"]
    for layer, modules in table.items():
        on_disk = {p.stem for p in (ROOT / "dit360" / layer).glob("*.py") if p.stem != "__init__"}
        commands = set(re.findall(rf"python -m dit360\.{layer}\.(\w+)", " ".join(modules.values())))
        assert on_disk == set(modules) | commands, layer


def definitions(path: Path) -> dict[str, list[str] | None]:
    """A module's top-level names (read, not imported: fast), each function's with its
    parameters, other names with None."""
    names = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            names[node.name] = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
        elif isinstance(node, ast.ClassDef):
            names[node.name] = None
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id: None for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0]: None for a in node.names}
    return names


@pytest.mark.parametrize(
    "layer,module", [(la, m) for la, ms in layer_table().items() for m in ms], ids=str
)
def test_layer_table_names_exist(layer, module):
    """Each name the table gives a module is in it; `f(a, b)` has those parameters, in order, and
    `key=value` is a parameter of the function before it; a path is a file."""
    path = ROOT / "dit360" / layer / f"{module}.py"
    assert path.is_file(), f"no module dit360.{layer}.{module}"
    defined, last = definitions(path), None
    for name in re.findall(r"`([^`]+)`", layer_table()[layer][module]):
        if name.startswith("dit360/"):
            assert (ROOT / name).is_file(), name
        elif m := re.fullmatch(r"(\w+)\(([\w, ]*)\)", name):
            params = defined.get(m.group(1)) or []
            args = [a.strip() for a in m.group(2).split(",")]
            assert params[: len(args)] == args, f"{name}: dit360.{layer}.{module} has {params}"
        elif m := re.fullmatch(r"(\w+)=.+", name):
            assert m.group(1) in (defined.get(last) or []), f"{name}: not a parameter of {last}"
        elif re.fullmatch(r"[A-Za-z_]\w*", name):
            assert name in defined, f"dit360.{layer}.{module} has no {name}"
            last = name


def heading_anchors() -> set[str]:
    """GitHub's anchors of the README's headings."""
    outside = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    titles = re.findall(r"^#+ (.+)$", outside, re.M)
    return {re.sub(r"[^\w\- ]", "", t.replace("`", "").lower()).replace(" ", "-") for t in titles}


def test_links_resolve():
    """Every relative link is a file of the repository; every #anchor a heading."""
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert links
    anchors = heading_anchors()
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, link
        elif not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_named_paths_exist():
    """Every repository path the README names in backticks (`tests/x.py`, `dit360/...`) exists."""
    tops = ("tests/", "benchmarks/", "dit360/", "docs/", ".ci/")
    named = {p for p in re.findall(r"`([\w./-]+)`", README) if p.startswith(tops)}
    named |= {w for _, body in BLOCKS for w in re.findall(r"[\w./-]+", body) if w.startswith(tops)}
    named |= {f"tests/{t}" for t in re.findall(r"`(test_\w+\.py)`", README)}  # "`test_x.py` for"
    assert named
    missing = [p for p in sorted(named) if not (ROOT / p).exists()]
    assert missing == []
