"""House rules a reader relies on (docs/STYLE.md), checked on the source: short functions, named results."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "softtokens"
MAX_LINES = 60


def _functions():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node


def _triton_kernel(node) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def test_no_function_is_over_60_lines_but_triton_kernels():
    long = [f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for name, node in _functions()
            if node.end_lineno - node.lineno + 1 > MAX_LINES and not _triton_kernel(node)]
    assert not long, long


def test_no_function_returns_a_tuple_of_four_or_more():
    wide = [f"{name}:{node.name}" for name, node in _functions() for r in ast.walk(node)
            if isinstance(r, ast.Return) and isinstance(r.value, ast.Tuple) and len(r.value.elts) >= 4]
    assert not wide, wide
