"""Capsule's built-in interpreter: code strings run like notebook cells.

`run_cell(code)` runs `code` in one namespace that lives as long as the sandbox does: a new
sandbox for every `run_python` call, or one per session, where variables, imports and
definitions carry over from cell to cell. The value of a final expression is the cell's
result: as JSON when it is JSON, else its `repr`. Tracebacks point into the cell's own lines.
"""

import ast
import json
import linecache

# The first syntax tree of an interpreter sets up the `ast` node types: done once here, so
# that it is in the image's snapshot rather than in every cell's sandbox.
compile(ast.parse("_ = 0"), "<warm-up>", "exec")

# The session's globals, as a module's would be.
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
_cells = 0


def run_cell(code):
    global _cells
    _cells += 1
    filename = f"<cell {_cells}>"
    # Kept for tracebacks (there is no file to read the lines from).
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    try:
        # A cell that is one expression needs no syntax tree: the common case, made cheap.
        expression = compile(code, filename, "eval")
    except SyntaxError:
        pass
    else:
        return _jsonable(eval(expression, namespace))
    try:
        tree = ast.parse(code, filename, "exec")
    except SyntaxError as error:
        # The error points at the cell; the parser's own frames say nothing more.
        raise error.with_traceback(None) from None
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, filename, "exec"), namespace)
    if last is None:
        return None
    return _jsonable(eval(compile(last, filename, "eval"), namespace))


def _jsonable(value):
    """`value` when JSON can carry it, else its `repr`."""
    if value is None or type(value) in (str, int, bool):
        return value
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError, RecursionError):
        return repr(value)
