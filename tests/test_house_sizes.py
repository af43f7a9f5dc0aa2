"""House rules on size: no module of distconv/ or scripts/ over MAX_FILE_LINES lines, no
function over MAX_FUNCTION_LINES lines (its ``def`` to its last line, decorators not
counted), so each can be read in one sitting."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _too_long(path: Path, root: Path = ROOT) -> list:
    """``[(what, lines)]`` of ``path`` and its functions above the limits (paths relative
    to ``root``)."""
    src = path.read_text(encoding="utf-8")
    out = []
    n = len(src.splitlines())
    if n > MAX_FILE_LINES:
        out.append((str(path.relative_to(root)), n))
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append((f"{path.relative_to(root)}:{node.lineno} {node.name}", length))
    return out


def test_no_long_modules_or_functions():
    files = sorted((ROOT / "distconv").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    assert len(files) > 100
    bad = [b for f in files for b in _too_long(f)]
    assert bad == [], bad


def test_the_size_check_sees_a_long_function(tmp_path):
    """Negative control: a function of 81 lines and a file of 501 are reported."""
    f = tmp_path / "m.py"
    body = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    f.write_text(body + "\n" * (MAX_FILE_LINES + 1 - len(body.splitlines())))
    assert [what for what, _ in _too_long(f, tmp_path)] == ["m.py", "m.py:1 f"]
