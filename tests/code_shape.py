"""The size rules of the code (docs/architecture.md): no module over 300 lines except the families' and
heatmap.py, no function over 60 lines. `python tests/code_shape.py` lists what breaks them."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE, MAX_FUNCTION = 300, 60
EXEMPT = ("pipeline/families/", "pipeline/heatmap.py")


def sources() -> list:
    return [ROOT / "app.py"] + sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "ui").rglob("*.py"))


def long_modules() -> list:
    out = []
    for path in sources():
        name = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE and not name.startswith(EXEMPT):
            out.append(f"{name}: {lines} lines")
    return out


def long_functions() -> list:
    out = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    return out


if __name__ == "__main__":
    for line in long_modules() + long_functions():
        print(line)
