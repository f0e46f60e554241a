"""docs/reliability.md: every test its table names exists (in tests/), and every test in
tests/reliability is named there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).parent
DOC = HERE.parent.parent / "docs" / "reliability.md"


def _tests(paths) -> set[str]:
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                out.add(node.name)
    return out


def test_every_named_test_exists():
    named = set(re.findall(r"`(test_[A-Za-z0-9_]+)`", DOC.read_text()))
    defined = _tests(HERE.glob("test_reliability_*.py"))
    anywhere = _tests(HERE.parent.rglob("test_*.py"))
    assert len(named) >= 40
    assert not named - anywhere, f"named in docs/reliability.md but not defined: {sorted(named - anywhere)}"
    missing = {n for n in defined - named if n != "test_every_named_test_exists"}
    assert not missing, f"tests not listed in docs/reliability.md: {sorted(missing)}"
