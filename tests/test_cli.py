"""The console scripts as a user starts them (`longllama-convert`, `longllama-corpus`, `longllama-passkey`,
`longllama-train`): `--help` and argument errors come before torch and transformers load, `--threads` is there (in the
scripts that run torch), and `import longllama` still
registers with the Auto classes everywhere else (`longllama/__init__.py`)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longllama import CONSOLE_SCRIPTS

HEAVY = {"torch", "transformers", "accelerate", "safetensors"}
# An argument error of each script: (arguments, what stderr says)
BAD_ARGUMENTS = {
    "longllama-convert": (["src", "dst", "--threads", "0"], "invalid value '0'"),
    "longllama-corpus": (["out", "--root"], "expected one argument"),
    "longllama-passkey": (["--demo", "--lengths", "4x"], "invalid length"),
    "longllama-train": (["--steps", "1", "--data", "corpus"], "Pass exactly one of --model"),
}
NO_TORCH = {"longllama-corpus"}  # reads text files only: no torch threads to set


def run_script(name: str, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the installed console script `name`, or the Python file at path `name`, under `python -X importtime`:
    (the result, top-level modules it imported)."""
    script = name if Path(name).is_file() else shutil.which(name)
    assert script, f"the {name} console script is not installed (pip install -e .)"
    result = subprocess.run([sys.executable, "-X", "importtime", script, *args], capture_output=True, text=True,
                            timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    return result, imported


def test_the_scripts_are_the_ones_setup_cfg_installs():
    assert set(BAD_ARGUMENTS) == set(CONSOLE_SCRIPTS)


@pytest.mark.parametrize("name", CONSOLE_SCRIPTS)
def test_help_answers_before_torch_loads(name):
    result, imported = run_script(name, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:") and ("--threads" in result.stdout) == (name not in NO_TORCH)
    assert "argparse" in imported, "-X importtime lists the imports"
    assert not imported & HEAVY


@pytest.mark.parametrize("name", CONSOLE_SCRIPTS)
def test_argument_errors_come_before_torch_loads(name):
    args, message = BAD_ARGUMENTS[name]
    result, imported = run_script(name, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not imported & HEAVY


@pytest.mark.parametrize("name", ["quickstart.py", "document_session.py"])
def test_example_help_answers_before_torch_loads(name):
    """The examples a newcomer runs first parse their arguments before torch, transformers and the package load."""
    script = str(Path(__file__).resolve().parents[1] / "examples" / name)
    for args, code, answer in ((["--help"], 0, "usage:"), (["--tokens", "x"], 2, "error: argument --tokens")):
        result, imported = run_script(script, *args)
        assert result.returncode == code and answer in result.stdout + result.stderr, result.stderr[-2000:]
        assert "argparse" in imported and not imported & (HEAVY | {"longllama"})


def test_train_help_prints_each_default_once():
    result, _ = run_script("longllama-train", "--help")
    text = " ".join(result.stdout.split())
    assert "(default: the model directory)" in text
    for flag_help in text.split(" --")[1:]:
        assert flag_help.count("(default") <= 1, flag_help


def python(code: str, argv0: str = "-c") -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose sys.argv[0] is `argv0` when longllama is imported."""
    code = f"import sys; sys.argv[0] = {argv0!r}\n" + code
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_registers_with_the_auto_classes():
    result = python(
        "import longllama\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "config = AutoConfig.for_model('longllama', num_hidden_layers=2, mem_layers=[1])\n"
        "assert type(AutoModelForCausalLM.from_config(config)) is longllama.LongLlamaForCausalLM\n"
        "from longllama.modeling.knn_longllama import INDEX_BACKENDS\n"
        "assert {'faiss', 'hnswlib'} <= set(INDEX_BACKENDS)\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_in_a_console_script_import_defers_and_names_stay_available():
    result = python(
        "import longllama\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "assert longllama.demo_checkpoint.__module__ == 'longllama.demo' and 'torch' not in sys.modules\n"
        "from longllama import LongLlamaConfig\n"  # a public name, imported on first use
        "from longllama.modeling.knn_longllama import INDEX_BACKENDS\n"
        "assert set(INDEX_BACKENDS) == {'exact'}\n"  # not registered yet
        "longllama.register(); longllama.register()\n"  # once or twice: the same
        "from transformers import AutoConfig\n"
        "assert type(AutoConfig.for_model('longllama')) is LongLlamaConfig\n"
        "assert set(INDEX_BACKENDS) == {'exact', 'faiss', 'hnswlib'}\n",
        argv0="/some/venv/bin/longllama-passkey",
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_threads_flag_sets_torch_threads(tmp_path):
    """`--threads` reaches torch before any work (here: a conversion that fails at once on a missing source)."""
    result = python(
        "import torch\n"
        "from longllama.conversion.cli import main\n"
        f"assert main([{str(tmp_path / 'missing')!r}, {str(tmp_path / 'out')!r}, '--threads', '3']) == 2\n"
        "assert torch.get_num_threads() == 3\n",
        argv0="longllama-convert",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "error:" in result.stderr
