"""House rule: code outside a package does not import another package's private names.

A package is ``distconv`` itself (its top-level modules) or one of its subpackages
(``distconv.nn``, ``distconv.planner``, ...; ``distconv.ops.cuda`` counts as part of
``distconv.ops``). An import ``from <module> import _name`` (``_name`` not a dunder)
whose module lies in another package than the importing file is a violation.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "distconv"


def _package(module: str, root: Path) -> str:
    """``distconv.<sub>`` for a module in (or the package of) a subpackage, else
    ``distconv``."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (root / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return "distconv"


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _target(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def violations(root: Path = ROOT) -> list:
    out = []
    for path in sorted(root.rglob("*.py")):
        mod = _module_of(path, root)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _target(mod, is_pkg, node)
            if not target.startswith("distconv") or _package(target, root) == _package(
                    mod + ".__init__" if is_pkg else mod, root):
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} imports "
                               f"{a.name} from {target}")
    return out


def test_no_private_names_across_packages():
    assert violations() == []


def test_the_check_finds_a_private_import(tmp_path):
    pkg = tmp_path / "distconv"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "models").mkdir()
    for p in (pkg / "__init__.py", pkg / "nn" / "__init__.py", pkg / "models" / "__init__.py"):
        p.write_text("")
    (pkg / "nn" / "module.py").write_text("def _hidden():\n    return 1\n")
    (pkg / "models" / "net.py").write_text("from ..nn.module import _hidden\n")
    (pkg / "nn" / "conv.py").write_text("from .module import _hidden\n")  # same package
    got = violations(pkg)
    assert len(got) == 1 and "models/net.py" in got[0] and "_hidden" in got[0]
