"""The split between the checkpoint code and the package (docs/architecture.md): what `modeling/` may import, and the
compiled kernel built at install time, or left out without a compiler."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import MODELING_DIR

REPO = Path(__file__).resolve().parents[1]
# Modules the checkpoint code must never import: no compiler, no foreign code loading, no optional search libraries.
FORBIDDEN = {"ctypes", "subprocess", "importlib", "faiss", "hnswlib", "longllama", "cffi", "distutils", "setuptools"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(MODELING_DIR.glob("*.py")), ids=lambda p: p.name)
def test_checkpoint_code_imports_only_torch_transformers_and_itself(path):
    assert not imported_modules(path) & FORBIDDEN, path.name


def build_wheel(tmp_path: Path, env: dict) -> list[str]:
    """Build a wheel of a copy of the source tree (no build outputs of this checkout) and list its files."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                             str(source)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_kernel_is_built_at_install_and_left_out_without_a_compiler(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler:
        files = build_wheel(tmp_path / "with", dict(os.environ, CC=compiler))
        assert any(f.startswith("longllama/_kernels.") for f in files), files
    files = build_wheel(tmp_path / "without", dict(os.environ, CC=str(tmp_path / "no-such-cc")))
    assert not any(f.endswith((".so", ".pyd")) for f in files)  # the install still succeeds, torch path only
    assert "longllama/modeling/modeling_longllama.py" in files and "longllama/csrc/attend.h" not in files
