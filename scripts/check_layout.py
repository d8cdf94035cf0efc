"""Checks the package's layout rules (issue 26) from the code's own imports, read with ``ast``.

Usage:
    .venv/bin/python scripts/check_layout.py [--package shardckpt] [--scripts scripts/bench ...]

Prints every violation, grouped by rule, and exits 1 when there is any (0 when there is none).
Nothing is imported or run: each module is parsed, and every ``import`` / ``from ... import``
anywhere in it counts, at module level, inside functions and classes, under ``if TYPE_CHECKING``
or ``try``, absolute or relative.

The rules, on the package folder:
  top-level   at most 6 modules directly in the package folder. Counted: every ``.py`` file there
              except ``__init__.py``, ``__main__.py`` and ``_version.py`` (the package's own
              plumbing, not modules a reader has to learn).
  circles     no import circle: no strongly connected component of more than one module (or a
              module importing itself) in the graph of module -> module it imports. An import
              edge goes to the module named: ``from pkg import name`` goes to ``pkg.name`` where
              that is a module, else to ``pkg`` (its ``__init__``); parents' ``__init__`` files
              that Python runs on the way are not edges of their own.
  size        no module over 500 lines.
  private     no module imports a ``_private`` name (``from mod import _name``, or ``mod._name``
              through a module it imported) that another package folder defines. Dunder names
              are public; a ``_module`` itself (such as the native core) is a private module of
              the distribution, not a helper reached across folders, and is not counted.
  front-door  ``manage/``, ``cli/``, ``integrations/`` and ``ops/`` use the ``save`` and
              ``load`` pipelines only through the names their package ``__init__`` exports
              (``__all__`` where it is defined, else its public top-level names): no import of a
              module inside ``save/`` or ``load/``, no other name from the package.
On each ``--scripts`` folder (flat scripts that import each other by file name): circles only.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass, field

MAX_TOP_LEVEL = 6
MAX_LINES = 500
NOT_COUNTED = ("__init__.py", "__main__.py", "_version.py")
FRONT_USERS = ("manage", "cli", "integrations", "ops")
PIPELINES = ("save", "load")
RULES = ("top-level", "circles", "size", "private", "front-door")


@dataclass
class Import:
    """One imported module (``target``) and the names taken from it, at ``line``."""

    target: str
    names: tuple[str, ...]
    line: int


@dataclass
class Module:
    name: str                    # dotted, e.g. "shardckpt.manage.tier.local"
    path: str
    is_package: bool             # an __init__.py
    lines: int
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)
    attributes: list[tuple[str, str, int]] = field(default_factory=list)  # (module, attr, line)

    @property
    def folder(self) -> str:
        """The package the module's file lies in (a package's __init__ lies in itself)."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


# ---- reading a tree ---------------------------------------------------------------------------

def load_package(pkg_dir: str) -> dict[str, Module]:
    """Every module under ``pkg_dir`` by dotted name, parsed, with its imports resolved."""
    pkg_dir = os.path.abspath(pkg_dir)
    root = os.path.basename(pkg_dir)
    modules = {}
    for base, dirs, files in os.walk(pkg_dir):
        dirs[:] = sorted(d for d in dirs if os.path.isfile(os.path.join(base, d, "__init__.py")))
        rel = os.path.relpath(base, pkg_dir)
        prefix = root if rel == "." else root + "." + rel.replace(os.sep, ".")
        for f in sorted(files):
            if f.endswith(".py"):
                name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                modules[name] = _parse(name, os.path.join(base, f), f == "__init__.py")
    for m in modules.values():
        _resolve(m, modules)
    return modules


def load_scripts(folder: str) -> dict[str, Module]:
    """The flat scripts of ``folder``, which import each other by file name (their folder is
    first on ``sys.path`` when one runs)."""
    modules = {f[:-3]: _parse(f[:-3], os.path.join(folder, f), False)
               for f in sorted(os.listdir(folder)) if f.endswith(".py")}
    for m in modules.values():
        _resolve(m, modules)
    return modules


def _parse(name: str, path: str, is_package: bool) -> Module:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return Module(name, path, is_package, len(text.splitlines()), ast.parse(text, path))


def _absolute(m: Module, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (relative ones resolved against ``m``)."""
    if not node.level:
        return node.module or ""
    parts = m.folder.split(".")
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _resolve(m: Module, modules: dict[str, Module]) -> None:
    """Fill ``m.imports`` (only modules inside the tree) and the ``alias._attr`` reaches."""
    aliases = {}  # local name -> module it stands for
    for node in ast.walk(m.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _known(a.name, modules)
                if target:
                    m.imports.append(Import(target, (), node.lineno))
                    aliases[a.asname or a.name] = a.name if a.asname or a.name in modules \
                        else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(m, node)
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in modules:
                    m.imports.append(Import(sub, (), node.lineno))
                    aliases[a.asname or a.name] = sub
                elif source in modules and not _submodule(modules[source], a.name):
                    m.imports.append(Import(source, (a.name,), node.lineno))
    for node in ast.walk(m.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target in modules and node.attr.startswith("_"):
                m.attributes.append((target, node.attr, node.lineno))


def _submodule(package: Module, name: str) -> bool:
    """Whether ``from package import name`` takes a module the tree has no source of (the
    compiled native core): the package's ``__init__`` does not bind the name itself."""
    return package.is_package and name not in defined_names(package)


def _known(dotted: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the tree (``import a.b.c``)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def defined_names(m: Module) -> set[str]:
    """The names a module binds at its top level (defs, classes, assignments, imports)."""
    names = set()
    for node in _top_level(m.tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _top_level(body):
    """Statements at module level, looking into ``if``/``try``/``with`` blocks there."""
    for node in body:
        yield node
        for attr in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, attr, None)
            if isinstance(inner, list) and not isinstance(
                    node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from _top_level(inner)


def exports(m: Module) -> set[str]:
    """What a package ``__init__`` exports: its ``__all__`` (with ``+=``) where it defines one,
    else its public top-level names."""
    listed, found = set(), False
    for node in _top_level(m.tree.body):
        value = None
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            value = node.value
        elif isinstance(node, ast.AugAssign) and getattr(node.target, "id", "") == "__all__":
            value = node.value
        if isinstance(value, (ast.List, ast.Tuple)):
            found = True
            listed.update(e.value for e in value.elts if isinstance(e, ast.Constant))
    if found:
        return listed
    return {n for n in defined_names(m) if not n.startswith("_")}


# ---- the rules --------------------------------------------------------------------------------

def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    return {name: {i.target for i in m.imports} for name, m in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module, or a module
    that imports itself (Tarjan's algorithm, iterative so a deep graph cannot overflow)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    v = stack.pop()
                    on_stack.discard(v)
                    comp.append(v)
                    if v == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    found.append(sorted(comp))
    return sorted(found)


def circle_edges(comp: list[str], modules: dict[str, Module]) -> list[str]:
    """The imports that close a circle: ``a -> b (a.py:LINE, inside a function)``."""
    inside = set(comp)
    out = []
    for name in comp:
        m = modules[name]
        nested = _nested_lines(m.tree)
        for i in m.imports:
            if i.target in inside:
                where = "inside a function" if i.line in nested else "module level"
                out.append(f"{name} -> {i.target} ({os.path.basename(m.path)}:{i.line}, {where})")
    return sorted(set(out))


def _nested_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines.update(n.lineno for n in ast.walk(node) if hasattr(n, "lineno"))
    return lines


def top_level_violations(modules: dict[str, Module], root: str) -> list[str]:
    top = sorted(n for n, m in modules.items() if m.folder == root and not m.is_package
                 and os.path.basename(m.path) not in NOT_COUNTED)
    if len(top) <= MAX_TOP_LEVEL:
        return []
    return [f"{len(top)} modules at the top level of {root}/ (at most {MAX_TOP_LEVEL}): "
            + ", ".join(n.rpartition(".")[2] for n in top)]


def size_violations(modules: dict[str, Module]) -> list[str]:
    return [f"{m.path}: {m.lines} lines (at most {MAX_LINES})"
            for m in sorted(modules.values(), key=lambda m: -m.lines) if m.lines > MAX_LINES]


def private_violations(modules: dict[str, Module]) -> list[str]:
    out = []
    defined = {}
    for m in modules.values():
        reaches = [(i.target, n, i.line) for i in m.imports for n in i.names] + m.attributes
        for target, name, line in reaches:
            if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
                continue
            t = modules[target]
            if t.folder == m.folder:
                continue
            if target not in defined:
                defined[target] = defined_names(t)
            if name not in defined[target]:
                continue  # a private submodule (the native core), not a helper
            out.append(f"{m.name} ({os.path.basename(m.path)}:{line}) uses {target}.{name}")
    return sorted(set(out))


def front_door_violations(modules: dict[str, Module], root: str) -> list[str]:
    out = []
    pipelines = {f"{root}.{p}" for p in PIPELINES if f"{root}.{p}" in modules}
    users = tuple(f"{root}.{u}" for u in FRONT_USERS)
    for m in modules.values():
        if not (m.name in users or m.name.startswith(tuple(u + "." for u in users))):
            continue
        for i in m.imports:
            where = f"{m.name} ({os.path.basename(m.path)}:{i.line})"
            inside = next((p for p in pipelines if i.target.startswith(p + ".")), None)
            if inside:
                out.append(f"{where} imports {i.target}, inside {inside}/")
            elif i.target in pipelines:
                missing = [n for n in i.names if n not in exports(modules[i.target])]
                out += [f"{where} imports {i.target}.{n}, which its __init__ does not export"
                        for n in missing]
    return sorted(set(out))


def check_package(pkg_dir: str) -> dict[str, list[str]]:
    """Every rule's violations on the package at ``pkg_dir``, by rule name."""
    modules = load_package(pkg_dir)
    root = os.path.basename(os.path.abspath(pkg_dir))
    return {
        "top-level": top_level_violations(modules, root),
        "circles": [" <-> ".join(c) + ": " + "; ".join(circle_edges(c, modules))
                    for c in circles(import_graph(modules))],
        "size": size_violations(modules),
        "private": private_violations(modules),
        "front-door": front_door_violations(modules, root),
    }


def check_scripts(folder: str) -> list[str]:
    """The import circles among the flat scripts of ``folder``."""
    modules = load_scripts(folder)
    return [" <-> ".join(c) + ": " + "; ".join(circle_edges(c, modules))
            for c in circles(import_graph(modules))]


# ---- the command ------------------------------------------------------------------------------

def main(argv=None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", default=os.path.join(here, "shardckpt"))
    p.add_argument("--scripts", nargs="*", default=[os.path.join(here, "scripts", "bench")],
                   help="folders of flat scripts to check for circles")
    args = p.parse_args(argv)
    found = check_package(args.package)
    for folder in args.scripts:
        found["circles"] += [f"{folder}: {c}" for c in check_scripts(folder)]
    total = sum(len(v) for v in found.values())
    for rule in RULES:
        print(f"{rule}: {len(found[rule]) or 'ok'}")
        for line in found[rule]:
            print(f"  {line}")
    print(f"{total} violation(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
