"""The package's layers point one way: no import cycle (counting imports inside functions, which only hide one),
library modules never import the stage commands, the CLI or the config composition; and nothing in the code or the
docs points at a file the repository does not have."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "epd"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The epd modules ``name`` imports anywhere in its body (``from . import x`` counts x when it is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "epd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "epd":
                continue
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out |= subs or {base}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_library_modules_do_not_import_the_commands():
    top = ("epd.cli", "epd.stages", "epd.config")
    for name, deps in graph().items():
        if name.startswith(top) or name == "epd.workflow":
            continue
        assert not {d for d in deps if d.startswith(top)}, (name, deps)


# Files the code and docs point at: paths under the repository's own top-level folders.
PATH_RE = re.compile(r"(?<![\w/.-])((?:epd|tests|workflow|config|data|docs)/[\w./<>*{}-]*[\w*}])")
SOURCES = [*PACKAGE.rglob("*.py"), REPO / "README.md", REPO / "config" / "README.md", REPO / "Snakefile",
           REPO / "dvc.yaml", *(REPO / "workflow").rglob("*.smk"), *(REPO / "workflow").rglob("*.md"),
           *(REPO / "docs").rglob("*.md"), *(REPO / "config").glob("*.yaml")]
# Paths the project writes (or a user supplies) rather than ships.
MADE = ("data/weights/NAME", "data/teacher/", "tests/system/artifacts")


def test_no_reference_to_a_file_the_repository_does_not_have():
    missing = []
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"design\.md|contract \d|\bthe issue\b", text), path
        for m in PATH_RE.finditer(text):
            ref = m[1].rstrip(".")
            if any(c in ref for c in "<>*{}") or re.search(r"\b[A-Z]{1,5}\b", ref) or ref.startswith(MADE):
                continue   # a pattern (NAME, <experiment>, *.json), not a file
            if not (REPO / ref).exists() and not list(REPO.glob(ref + ".*")):   # a path or a stem (tables, weights)
                missing.append(f"{path.relative_to(REPO)}: {ref}")
    assert missing == []
