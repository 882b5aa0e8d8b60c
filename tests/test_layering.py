"""The package's layering: inference never imports the training code, and no two modules import
each other (directly or through others), at module level or inside functions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import denuc

PACKAGE = Path(denuc.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> denuc modules it imports`` (every import statement: module level, in
    functions, under ``TYPE_CHECKING`` excepted). ``from a import b`` counts as importing ``a``
    and, when ``a.b`` is a module, ``a.b``."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - node.level + (path.name == "__init__.py")]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                deps.add(prefix)
                deps.update(f"{prefix}.{a.name}" for a in node.names)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "denuc.core.device" in graph["denuc.detect.api"]  # the graph sees imports inside functions
    assert cycles(graph) == []


def test_inference_modules_never_import_training() -> None:
    """What the inference entry points reach through any import (function-level included) is
    never a training module."""
    graph = import_graph()
    seen: set[str] = set()
    todo = ["denuc.pipeline", "denuc.detect.api", "denuc.stream.job", "denuc.pipeline_cli"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    assert "denuc.core.device" in seen and not [m for m in seen if m.startswith("denuc.train")]


def test_predict_slide_imports_no_training_module(tmp_path: Path) -> None:
    """After ``DeNuC.load()`` and ``predict_slide(tile, mpp=0.5, out=folder)`` no ``denuc.train``
    module is loaded (in a fresh interpreter, so that other tests' imports do not count)."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np
        from PIL import Image
        import denuc
        sample = Path(denuc.__file__).parent / "assets" / "sample" / "brca-m2c-sample.png"
        tile = np.asarray(Image.open(sample).convert("RGB"))[:96, :96]
        m = denuc.DeNuC.load(device="cpu")
        m.predict_slide(tile, mpp=0.5, out={str(tmp_path)!r})
        assert any(p.name.endswith(".summary.json") for p in Path({str(tmp_path)!r}).iterdir())
        print(sorted(k for k in sys.modules if k.startswith("denuc.train")))
    """)
    env = {**os.environ, "DENUC_RUNTIME": "torch", "PYTHONPATH": str(PACKAGE.parent)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
