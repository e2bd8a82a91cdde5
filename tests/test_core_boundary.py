"""The boundary of the method: every module of dit360/core/ imports only the standard library,
torch, einops, numpy and the core itself, and no core function's signature names an option object
or a path (docs/METHOD.md)."""

import ast
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).parent.parent / "dit360" / "core"
ALLOWED = {"torch", "einops", "numpy"} | set(sys.stdlib_module_names)
BANNED_TYPES = ("Options", "Namespace", "Path")  # EditOptions, SampleOptions end in Options
BANNED_NAMES = ("opts", "args", "path")  # and names like `options`, `out_path`, `paths`


def imports(tree: ast.Module, package: str) -> list[str]:
    """The absolute names of the modules a module imports; relative ones resolved in `package`."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x` imports module x; `from .m import x`, module m
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                mods = [node.module] if node.module else [a.name for a in node.names]
                names += [f"{base}.{m}" for m in mods]
            else:
                names.append(node.module)
    return names


def import_errors(source: str, package: str = "dit360.core") -> list[str]:
    """The imports of a module of `package` that leave the standard library, torch, einops, numpy
    and dit360.core."""
    names = imports(ast.parse(source), package)
    return [n for n in names if n.split(".")[0] not in ALLOWED and not in_core(n)]


def in_core(name: str) -> bool:
    """Whether `name` is dit360.core or one of its modules (that exists)."""
    parts = name.split(".")
    return parts[:2] == ["dit360", "core"] and (
        len(parts) == 2 or (CORE / f"{parts[2]}.py").exists()
    )


def signature_errors(source: str) -> list[str]:
    """Function parameters that are option objects or paths, by annotation or by name."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is None:
                continue
            note = ast.unparse(arg.annotation) if arg.annotation else ""
            low = arg.arg.lower()
            if any(t in note for t in BANNED_TYPES) or any(n in low for n in BANNED_NAMES):
                bad.append(f"{node.name}({arg.arg}: {note or '?'})")
            elif low in ("options", "o"):
                bad.append(f"{node.name}({arg.arg})")
        if node.returns is not None and any(t in ast.unparse(node.returns) for t in BANNED_TYPES):
            bad.append(f"{node.name} -> {ast.unparse(node.returns)}")
    return bad


MODULES = sorted(CORE.glob("*.py"))


def test_core_exists():
    """The core holds the method: the checks below run over these modules."""
    names = {p.stem for p in MODULES}
    assert {"model", "layers", "rope", "grid", "sampling", "editing", "loss", "lora"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_imports_nothing_of_the_runtime(path):
    """A core module imports the standard library, torch, einops, numpy and the core only."""
    assert import_errors(path.read_text()) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_signatures_take_no_options_or_paths(path):
    """Core functions take tensors, modules and the method's small parameter dataclasses."""
    assert signature_errors(path.read_text()) == []


def test_the_checks_catch_what_they_guard():
    """The checks fail on what the runtime does: the offload and tqdm imports of memory/ahead.py
    (the runtime's sampling; once all of sampling.py was like it), the CLI options editing took, a
    path, an upward or unknown relative import."""
    runtime = (CORE.parent / "memory" / "ahead.py").read_text()
    assert {"dit360.memory.offload", "tqdm.auto"} <= set(import_errors(runtime, "dit360.memory"))
    assert import_errors("from ..offload import lent") == ["dit360.offload"]
    assert import_errors("from .offload import lent") == ["dit360.core.offload"]
    assert import_errors("from . import offload") == ["dit360.core.offload"]
    assert import_errors("from tqdm.auto import tqdm\nimport PIL") == ["tqdm.auto", "PIL"]
    assert import_errors("from . import grid\nfrom .grid import Grid\nimport torch.nn") == []
    assert import_errors("from dit360.app.options import EditOptions") == ["dit360.app.options"]
    editing = (CORE.parent / "app" / "editing.py").read_text()  # the runtime's, from EditOptions
    assert any("EditOptions" in e for e in signature_errors(editing))
    bad = "def invert(model, x, opts: EditOptions): ...\ndef save(x, out: Path): ...\n"
    bad += "def run(args): ...\ndef read(image_path: str): ..."
    assert len(signature_errors(bad)) == 4
    assert signature_errors("def step(x: Tensor, v: Tensor, dt: float) -> Tensor: ...") == []


def test_core_size_and_reading_traces():
    """The core stays under 1,400 lines and each reading trace under 400 (benchmarks/core_size.py);
    a trace grows with what its entry reaches (the forward holds the blocks, not the loss)."""
    sys.path.insert(0, str(CORE.parent.parent / "benchmarks"))
    import core_size

    assert sum(core_size.module_lines().values()) <= core_size.CORE_LIMIT
    traces = {name: core_size.trace(entries) for name, entries in core_size.TRACES.items()}
    assert ("layers", "DoubleStreamBlock") in traces["forward with the wrap"]
    assert ("model", "Flux") not in traces["training loss"]  # the model is its own trace
    assert ("sampling", "predict") in traces["editing"] and ("sampling", "step") in traces[
        "sampling"
    ]
    for name, entries in core_size.TRACES.items():
        assert core_size.trace_lines(entries) <= core_size.TRACE_LIMIT, name
