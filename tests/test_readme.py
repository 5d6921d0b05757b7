"""The README's code map names every module of the package, and nothing that is gone."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _code_map() -> set:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))


def _has_code(path) -> bool:
    """A module with more than a docstring (and `__version__`): package markers are not listed."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
               and not (isinstance(n, ast.Assign) and n.targets[0].id == "__version__") for n in body)


def test_code_map_matches_the_tree():
    listed = _code_map()
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "effgen").rglob("*.py")
               if p.name != "__main__.py" and _has_code(p)}
    missing = sorted(modules - listed)
    gone = sorted(m for m in listed if not (ROOT / m.rstrip("/")).exists())
    assert not missing, f"modules missing from the README's code map: {missing}"
    assert not gone, f"the README's code map names paths that do not exist: {gone}"
