"""The size of the method (issue 24): lines of each dit360/core module and the four reading traces,
the core code reachable by name from an entry point. Exits 1 over the limits.

    python benchmarks/core_size.py

A trace starts at its entry definitions and follows every name (annotations included) that resolves
to a top-level function, class or assignment of a core module, through `from .m import x`; a class
counts whole (decorators, docstring, methods). A definition's lines run from its first decorator to
its last line.
"""

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "dit360" / "core"
CORE_LIMIT, TRACE_LIMIT = 1400, 400
TRACES = {  # name -> entry points (module, top-level name)
    "forward with the wrap": [("sampling", "predict"), ("model", "Flux"), ("grid", "Grid")],
    "sampling": [("sampling", "denoise"), ("sampling", "noise"), ("sampling", "schedule")],
    "editing": [("editing", "invert"), ("editing", "edit")],
    "training loss": [("loss", "flow_loss")],
}

Def = tuple[str, str]  # (module, top-level name)


def module_lines() -> dict[str, int]:
    """Lines of each core module."""
    return {p.stem: len(p.read_text().splitlines()) for p in sorted(CORE.glob("*.py"))}


def definitions() -> tuple[dict[Def, ast.stmt], dict[str, dict[str, Def]]]:
    """Every top-level definition of the core, and each module's names resolved to definitions."""
    defs, scope = {}, {}
    for path in sorted(CORE.glob("*.py")):
        mod, names = path.stem, {}
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                targets = [node.name]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                tgts = node.targets if isinstance(node, ast.Assign) else [node.target]
                targets = [n.id for t in tgts for n in ast.walk(t) if isinstance(n, ast.Name)]
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                names |= {a.asname or a.name: (node.module, a.name) for a in node.names}
                continue
            else:
                continue
            for t in targets:
                defs[(mod, t)] = node
                names[t] = (mod, t)
        scope[mod] = names
    return defs, scope


def span(node: ast.stmt) -> int:
    """Lines of a definition, decorators included."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return node.end_lineno - first + 1


def references(node: ast.AST) -> tuple[set[str], set[str]]:
    """The free names a definition's code reads, and those its annotations name (apart)."""
    notes, local = set(), set()
    for n in ast.walk(node):
        for a in (getattr(n, "annotation", None), getattr(n, "returns", None)):
            notes |= {id(x) for x in ast.walk(a)} if a is not None else set()
        if isinstance(n, ast.arg):
            local.add(n.arg)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and n is not node:
            local.add(n.id)
    names = [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in local]
    return {n.id for n in names if id(n) not in notes}, {n.id for n in names if id(n) in notes}


def is_module(node: ast.stmt) -> bool:
    """Whether a definition is a torch module class (an annotation naming one is not followed)."""
    return isinstance(node, ast.ClassDef) and any("nn." in ast.unparse(b) for b in node.bases)


def trace(entries: list[Def]) -> set[Def]:
    """The definitions reachable by name from the entries."""
    defs, scope = definitions()

    def resolve(key: Def) -> Def:
        while key not in defs and key[1] in scope.get(key[0], {}):  # an import: follow it
            key = scope[key[0]][key[1]]
        return key

    seen, todo = set(), [resolve(e) for e in entries]
    while todo:
        key = todo.pop()
        if key in seen or key not in defs:
            continue
        seen.add(key)
        code, notes = references(defs[key])
        names = [scope[key[0]][n] for n in code | notes if n in scope[key[0]]]
        for ref in map(resolve, names):
            if ref[1] in code or not is_module(defs.get(ref, ast.Pass())):
                todo.append(ref)
    return seen


def trace_lines(entries: list[Def]) -> int:
    """Lines of core code a reader reads from the entries."""
    defs, _ = definitions()
    return sum(span(defs[k]) for k in trace(entries))


def main() -> int:
    lines = module_lines()
    for mod, n in lines.items():
        print(f"{mod + '.py':<20} {n:>5}")
    total = sum(lines.values())
    print(f"{'core total':<20} {total:>5}   (limit {CORE_LIMIT})")
    traces = {name: trace_lines(entries) for name, entries in TRACES.items()}
    for name, n in traces.items():
        print(f"trace: {name:<24} {n:>5}   (limit {TRACE_LIMIT})")
    return int(total > CORE_LIMIT or max(traces.values()) > TRACE_LIMIT)


if __name__ == "__main__":
    sys.exit(main())
