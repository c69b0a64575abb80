"""Shared fixtures: tiny random LongLLaMA models (no downloads; everything is built in-process)."""

import io
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from transformers import LlamaConfig
from transformers.utils import logging

import longllama.modeling
from longllama import LongLlamaConfig, LongLlamaForCausalLM

# tests/compat runs in environments without the package (`.ci/compat`), not in this suite
collect_ignore = ["compat"]

MODELING_DIR = Path(longllama.modeling.__file__).parent
# The remote code every checkpoint must carry: each `*_longllama.py` of the package (the tokenizer's file only goes
# with a sentencepiece model), read from the directory so that a new module the converter forgets fails the tests.
CODE_FILES = sorted(p.name for p in MODELING_DIR.glob("*_longllama.py") if p.name != "tokenization_longllama.py")


# The start of a child script in which `import longllama` fails (installed before every other finder, the editable
# install's included): what a machine without the package sees when it loads a checkpoint's remote code.
IMPORT_BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class BlockLongLlama(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "longllama" or name.startswith("longllama."):
                raise ImportError(f"{name} is hidden from this process")
            return None


    sys.meta_path.insert(0, BlockLongLlama())
    """
)


def tiny_config(**overrides) -> LongLlamaConfig:
    """vocab 99, hidden 32, 4 layers, 4 heads, memory in layer 1, window 8, last_context_length 4."""
    fields = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8,
        last_context_length=4,
        mem_layers=[1],
        mem_dtype="float32",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return LongLlamaConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> LongLlamaForCausalLM:
    """A random fp32 LongLlamaForCausalLM in eval mode, with weights larger than the default init so that
    attention is far from uniform and mistakes show up in the logits."""
    torch.manual_seed(seed)
    model = LongLlamaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight") or "embed" in name or "lm_head" in name:
                param.normal_(0.0, 0.3)
    return model


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def left_pad(rows: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenizer-style left padding with pad id 0: (input_ids [B, length], attention_mask [B, length])."""
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    return ids, mask


def llama_config_like(config: LongLlamaConfig, **overrides) -> LlamaConfig:
    """The transformers LlamaConfig of the same architecture (what a LongLLaMA checkpoint loads into)."""
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tensors in tests are tiny: intra-op threads only add overhead (several-fold on a busy 2-core machine).
    Subprocesses started by tests set their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's console does."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def progress_bars(monkeypatch):
    """transformers' progress bars on (a CLI run in-process turns them off when stderr is not a terminal) and the
    model's window bar drawn at once instead of after `PROGRESS_DELAY` seconds; both restored afterwards."""
    was_enabled = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()
    monkeypatch.setattr(longllama.modeling.modeling_longllama, "PROGRESS_DELAY", 0)
    yield
    if was_enabled:
        logging.enable_progress_bar()
    else:
        logging.disable_progress_bar()


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model():
    return tiny_model()


@contextmanager
def checkpoint_kernels_only():
    """Within the block, only the checkpoint code's memory-attention kernels run: what torch.compile traces (the
    compiled kernel is not traceable, so the package's function hands compiled calls to them) and what a remote-code
    load runs. The package's `"blockwise"` function is put back afterwards."""
    from longllama.modeling import attention_longllama

    functions = attention_longllama.MEMORY_ATTENTION_FUNCTIONS
    package_blockwise = functions["blockwise"]
    functions["blockwise"] = attention_longllama.blockwise_memory_attention_forward
    try:
        yield
    finally:
        functions["blockwise"] = package_blockwise


@pytest.fixture(params=["kernel", "reference"])
def memory_attention_path(request, monkeypatch):
    """Run a test with each dense memory attention: the package's, whose compiled kernel reads memory while decoding
    (checked to be used), and the checkpoint code's blockwise kernel in plain torch."""
    from longllama import attention, kernels
    from longllama.modeling import attention_longllama

    if request.param == "reference":
        with checkpoint_kernels_only():
            yield "reference"
        return
    assert attention_longllama.MEMORY_ATTENTION_FUNCTIONS["blockwise"] is attention.blockwise_memory_attention_forward
    if kernels.compiled() is None:
        pytest.skip("the package was installed without a C compiler: no compiled kernels")
    calls = []
    real = attention.memory_attention
    monkeypatch.setattr(attention, "memory_attention", lambda *args: calls.append(1) or real(*args))
    yield "kernel"
    assert calls, "decoding never used the compiled memory attention"


@pytest.fixture
def checkpoint_kernels():
    """Only the checkpoint code's memory-attention kernels during the test (`checkpoint_kernels_only`)."""
    with checkpoint_kernels_only():
        yield
