"""The three layers: the core imports no adapter or program; adapters import no program."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {
    "hwbptt": ("hwbptt.torch", "hwbptt.keras", "hwbptt.programs", "adapters", "programs"),
    "adapters": ("hwbptt.programs", "programs"),
}


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_no_upward_imports(folder):
    forbidden = LAYERS[folder]
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.name == "__main__.py":  # the command-line launcher belongs to the programs
            continue
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_no_top_level_adapters_package_is_installed(tmp_path):
    """Outside the checkout, ``import adapters`` must fail: that name is not ours."""
    import subprocess
    import sys

    code = "import hwbptt.torch, importlib.util; print(importlib.util.find_spec('adapters'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
