"""The docs tell the truth (issue 19): README.md, docs/, benchmarks/README.md and examples/ claim nothing the code
contradicts, every command-line flag they mention exists, and every duration they state sits with the command that
measured it."""

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from longllama import corpus, passkey, train
from longllama.conversion import cli as convert_cli
from longllama.demo import DEMO_DIR, REQUIRED_FILES

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
EXAMPLES = sorted((REPO / "examples").rglob("*.py")) + sorted((REPO / "examples").rglob("*.yaml"))
PARSERS = {
    "longllama-convert": convert_cli.build_parser(),
    "longllama-passkey": passkey.build_parser(),
    "longllama-train": train.build_parser(),
    "longllama-corpus": corpus.build_parser(),
}
MODULES = {"longllama.conversion": "longllama-convert", "longllama.passkey": "longllama-passkey",
           "longllama.train": "longllama-train", "longllama.corpus": "longllama-corpus"}
# Flags of other programs the docs show: accelerate launch, torchrun, pip.
OTHER_TOOLS = {"--multi_gpu", "--num_processes", "--config_file", "--mpirun_hostfile", "--cpu", "--num_machines",
               "--mixed_precision", "--dynamo_backend", "--nproc_per_node", "--force-reinstall"}


def read(path: Path) -> str:
    return path.read_text()


def flags_of(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def script_flags() -> set[str]:
    """Flags that the benchmark and example scripts define (their own parsers)."""
    sources = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "examples").rglob("*.py"))
    return {flag for path in sources for flag in re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9_-]*)\"", read(path))}


# --------------------------------------------------------------------------------------------------------------------
# Claims the code contradicts

# (pattern, why it is false) for statements that must not appear anywhere in the docs or examples
FALSE_CLAIMS = [
    (r"(does not|doesn't|not yet|not) bundle|not bundled|no demo model",
     "the demo model is bundled: longllama-passkey --demo, longllama.demo_checkpoint()"),
    (r"runs? in (a few )?seconds|seconds on a (laptop )?CPU",
     "say how long with a measured figure and the command that measured it"),
    (r"pad_token\s*=\s*(tokenizer\.)?eos", "the demo and converted tokenizers pad as shipped"),
    (r"--threads[^.\n]*\b(not|no) (supported|available)", "every command-line tool has --threads"),
]


@pytest.mark.parametrize("pattern, why", FALSE_CLAIMS, ids=[why[:40] for _, why in FALSE_CLAIMS])
def test_no_claim_the_code_contradicts(pattern, why):
    found = [f"{path.relative_to(REPO)}: {match.group(0)!r}" for path in DOCS + EXAMPLES
             for match in re.finditer(pattern, read(path), flags=re.IGNORECASE)]
    assert not found, f"{why}: {found}"


def test_the_demo_is_bundled_and_runs_from_the_command_line():
    """What the docs say instead of 'not bundled'."""
    assert all((DEMO_DIR / name).is_file() for name in REQUIRED_FILES)
    assert "--demo" in flags_of(PARSERS["longllama-passkey"])


# Every "not supported (yet)" / "not built yet" statement, with the check that it is still true.
def _other_static_caches_are_refused() -> bool:
    model = tiny_model()
    try:
        model.generate(torch.randint(3, 99, (1, 12)), max_new_tokens=2, cache_implementation="offloaded_static")
    except ValueError as error:
        return "LongLlamaCache" in str(error)
    return False


def _no_attention_weights_with_knn() -> bool:
    try:
        tiny_model()(torch.randint(3, 99, (1, 30)), output_attentions=True, mem_top_k=2)
    except ValueError as error:
        return "mem_top_k" in str(error)
    return False


KNOWN_GAPS = {
    "not supported: quantized caches": _other_static_caches_are_refused,
    "not available with knn retrieval (`mem_top_k`)": _no_attention_weights_with_knn,
}


def test_every_stated_gap_is_real():
    gaps = re.compile(r"[^.:\n]*(?:\n[^.:\n]*)?\bnot (?:supported|built|available)(?: yet)?\b[^.\n]*", re.IGNORECASE)
    stated = {" ".join(match.group(0).split()).lower().strip() for path in DOCS + EXAMPLES
              for match in gaps.finditer(read(path))}
    unknown = {text for text in stated if not any(text.startswith(gap) or gap in text for gap in KNOWN_GAPS)}
    assert not unknown, f"add each to KNOWN_GAPS with a check that the code lacks it: {sorted(unknown)}"
    for gap, check in KNOWN_GAPS.items():
        if any(gap in text for text in stated):
            assert check(), f"the docs say {gap!r}, but the code has it now"


def test_dynamic_rope_scaling_is_said_to_never_take_effect():
    text = " ".join(read(REPO / "docs" / "inference.md").split())
    assert re.search(r'"dynamic"[^.]*never takes effect', text)


# --------------------------------------------------------------------------------------------------------------------
# Flags


def cli_invocations(text: str):
    """(console script, its flags) for every invocation in `text`: `longllama-x ...`, `-m longllama.y ...`, up to the
    end of the line, a code span, a comment or a shell operator (backslash continuations joined)."""
    text = text.replace("\\\n", " ")
    names = "|".join(map(re.escape, [*PARSERS, *(f"-m {module}" for module in MODULES)]))
    for match in re.finditer(rf"(?<![\w.-])({names})\b([^`#|;&\n]*)", text):
        name = match.group(1)
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", match.group(2)))
        yield MODULES.get(name.removeprefix("-m "), name), flags


@pytest.mark.parametrize("path", DOCS + EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_command_lines_use_the_commands_own_flags(path):
    wrong = [(name, sorted(flags - flags_of(PARSERS[name]))) for name, flags in cli_invocations(read(path))
             if flags - flags_of(PARSERS[name])]
    assert not wrong, wrong


def test_cli_invocations_are_found():
    """The parser of the test above sees through continuations, code spans and comments."""
    text = "x `longllama-passkey --demo` y\nlongllama-train --model m \\\n  --steps 3  # --not-this\n" \
           "accelerate launch --multi_gpu -m longllama.train --config c.yaml"
    assert list(cli_invocations(text)) == [
        ("longllama-passkey", {"--demo"}),
        ("longllama-train", {"--model", "--steps"}),
        ("longllama-train", {"--config"}),
    ]


def test_every_flag_mentioned_exists():
    known = set().union(*map(flags_of, PARSERS.values())) | script_flags() | OTHER_TOOLS
    mentioned = {(str(path.relative_to(REPO)), flag) for path in DOCS
                 for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", read(path))}
    assert not {item for item in mentioned if item[1] not in known}


# --------------------------------------------------------------------------------------------------------------------
# Durations

DURATION = re.compile(
    r"\b(takes?|took|runs? in|lasts?|in all|in about)\s+(about\s+|~|under\s+)?\d[\d.,]*\s?"
    r"(ms|s|seconds?|minutes?|min|hours?)\b",
    re.IGNORECASE,
)
COMMAND = re.compile(r"`[^`]*(python |longllama-|pytest|\.ci/|accelerate launch)[^`]*`|^```", re.MULTILINE)


@pytest.mark.parametrize("path", DOCS + EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_durations_come_with_their_command(path):
    """A sentence saying how long something takes names the command that measured it, in the same paragraph or
    earlier in the same section (a code block or a `command` in backticks)."""
    unnamed = []
    for section in re.split(r"^#+ ", read(path), flags=re.MULTILINE):
        for match in DURATION.finditer(section):
            paragraph_start = section.rfind("\n\n", 0, match.start())
            paragraph_end = section.find("\n\n", match.end())
            if not COMMAND.search(section[: paragraph_end if paragraph_end >= 0 else None]):
                unnamed.append(section[max(paragraph_start, 0) : match.end()][-160:])
    assert not unnamed, unnamed
