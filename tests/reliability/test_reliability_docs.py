"""docs/reliability.md: every test its table names exists in tests/reliability."""

from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).parent
DOC = HERE.parent.parent / "docs" / "reliability.md"


def test_every_named_test_exists():
    named = set(re.findall(r"`(test_[A-Za-z0-9_]+)`", DOC.read_text()))
    defined = set()
    for path in HERE.glob("test_reliability_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                defined.add(node.name)
    assert len(named) >= 40
    assert not named - defined, f"named in docs/reliability.md but not defined: {sorted(named - defined)}"
    missing = {n for n in defined - named if n != "test_every_named_test_exists"}
    assert not missing, f"tests not listed in docs/reliability.md: {sorted(missing)}"
