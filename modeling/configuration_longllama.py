"""LongLLaMA configuration: a `LlamaConfig` plus the Focused Transformer memory fields.

Field names and defaults follow the published LongLLaMA checkpoints, so their `config.json` files load unchanged
(`rope_theta` at top level, `rope_scaling: null`, `torch_dtype`, no `num_key_value_heads`).
"""

from dataclasses import field
from typing import Any

import torch
from transformers.models.llama.configuration_llama import LlamaConfig

from .compat_longllama import STRICT_CONFIGS, config_class

MEM_DTYPES = ("bfloat16", "float16", "float32", "float64", "int8")
MEM_INDEXES = ("exact", "faiss", "hnswlib")
MEM_ATTENTION_IMPLEMENTATIONS = ("blockwise", "eager", "sdpa")
# Fields checked by `validate_longllama` whenever they are set after construction: ours and the window.
VALIDATED_ON_SET = (
    "mem_layers", "mem_positionals", "mem_dtype", "mem_attention_grouping", "mem_attention_implementation",
    "last_context_length", "mem_top_k", "mem_index", "mem_index_options", "mem_max_tokens", "mem_keep_first",
    "mem_device", "torch_attention", "gradient_checkpoint_every_ith", "max_position_embeddings",
)

# The code files that ship in every checkpoint directory (see `save_pretrained`).
AUTO_MAP = {
    "AutoConfig": "configuration_longllama.LongLlamaConfig",
    "AutoModel": "modeling_longllama.LongLlamaModel",
    "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
}


@config_class
class LongLlamaConfig(LlamaConfig):
    r"""
    Configuration of a LongLLaMA model (Focused Transformer, arXiv 2307.03170): a Llama decoder whose `mem_layers`
    attend to their local window plus an external memory of (key, value) pairs. The fields beyond [`LlamaConfig`]
    (docs/inference.md#checkpoint, docs/memory.md); their defaults give the published behaviour:

        mem_layers (`list[int]`, `[]`): 0-based indices of the decoder layers with memory; `[]` turns memory off.
        mem_positionals (`bool`, `True`): `False`: memory layers use no rotary encoding at all.
        mem_dtype (`str`, `"bfloat16"`): torch dtype memory keys and values are stored in, cast back to the compute
            dtype when read (so memory is bf16-rounded even in an fp32 model); `"int8"`: per-vector absmax int8.
        mem_top_k (`int`, *optional*): kNN retrieval, each memory-layer query attends to its `mem_top_k` memory keys
            of highest inner product, in the same softmax; `None` attends to all of memory. Also a call argument.
        mem_index (`str`, `"exact"`): top-k search backend: `"exact"`, or the package's approximate `"faiss"` /
            `"hnswlib"`; `mem_index_options` (`dict`, *optional*) are its options.
        mem_max_tokens (`int`, *optional*): bound on the entries each memory layer keeps; the oldest are evicted first,
            except the first `mem_keep_first` (`int`, 0). At least one window plus `mem_keep_first`.
        mem_device (`str`, *optional*): device of the memory (e.g. `"cpu"` to offload); default: the layer's.
        mem_attention_grouping (`list[int]`, *optional*): published `[heads_per_group, queries_per_group]` bound on
            the eager kernel's peak memory; mathematically a no-op.
        mem_attention_implementation (`str`, `"blockwise"`): memory-layer kernel, `"blockwise"` (running
            log-sum-exp, linear in the memory), `"eager"` (the published computation) or `"sdpa"`; all compute the same.
        last_context_length (`int`, 1024): the last this-many tokens of a long input form the final local window (not
            written to memory). Also a call argument.
        torch_attention (`bool`, `False`): published flag, kept for compatibility; the kernel is chosen above.
        gradient_checkpoint_every_ith (`int`, 1): with gradient checkpointing on, checkpoint every i-th layer.
        max_position_embeddings (`int`, 2048): also the window length: prefill windows and the local cache's cap.

    Example: `LongLlamaConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, mem_layers=[2, 5])`.
    """

    model_type = "longllama"

    mem_layers: list[int] = field(default_factory=list)
    mem_positionals: bool = True
    mem_dtype: str = "bfloat16"
    mem_attention_grouping: Any = None  # [heads_per_group, queries_per_group]; checked in validate_longllama
    mem_attention_implementation: str | None = None
    last_context_length: int = 1024
    mem_top_k: int | None = None
    mem_index: str = "exact"
    mem_index_options: dict | None = None
    mem_max_tokens: int | None = None
    mem_keep_first: int = 0
    mem_device: str | None = None
    torch_attention: bool = False
    gradient_checkpoint_every_ith: int = 1

    def __post_init__(self, **kwargs):
        if self.mem_attention_implementation is None:
            self.mem_attention_implementation = "blockwise"
        if isinstance(self.mem_attention_grouping, tuple):
            self.mem_attention_grouping = list(self.mem_attention_grouping)
        self.mem_layers = sorted(self.mem_layers)
        if STRICT_CONFIGS:  # before transformers 5.10, LlamaConfig.__init__ has run (see config_class)
            super().__post_init__(**kwargs)
        # Our code files replace whatever the checkpoint named before (e.g. a classification head we do not ship).
        self.auto_map = dict(AUTO_MAP)
        if not self.architectures:
            self.architectures = ["LongLlamaForCausalLM"]
        self.validate_longllama()
        self._post_init_done = True  # from here on, LongLLaMA fields are validated when set (transformers' flag)

    def __setattr__(self, name, value):
        # diff vs Llama: a LongLLaMA field or the window set after construction is validated at once (and undone)
        old = self.__dict__.get(name)
        super().__setattr__(name, value)
        if name in VALIDATED_ON_SET and self.__dict__.get("_post_init_done"):
            try:
                self.validate_longllama()
            except (ValueError, TypeError):
                super().__setattr__(name, old)
                raise

    def to_dict(self):
        output = super().to_dict()
        output.pop("_post_init_done", None)  # diff vs Llama: our flag above (transformers < 5.24 would save it)
        return output

    @property
    def mem_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.mem_dtype)

    def validate_longllama(self):
        """Raise a `ValueError` naming the bad value of any LongLLaMA field (also called by the model)."""
        if not isinstance(self.mem_layers, list) or not all(
            isinstance(idx, int) and not isinstance(idx, bool) for idx in self.mem_layers
        ):
            raise ValueError(f"mem_layers={self.mem_layers!r} must be a list of layer indices (integers).")
        for idx in self.mem_layers:
            if not 0 <= idx < self.num_hidden_layers:
                raise ValueError(
                    f"mem_layers contains {idx}, which is not a layer index: indices must be in "
                    f"[0, {self.num_hidden_layers}) for a model with num_hidden_layers={self.num_hidden_layers}."
                )
        if len(set(self.mem_layers)) != len(self.mem_layers):
            raise ValueError(f"mem_layers={self.mem_layers} lists a layer more than once.")
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype={self.mem_dtype!r} is not supported; use one of {list(MEM_DTYPES)}.")
        grouping = self.mem_attention_grouping
        if grouping is not None and (
            not isinstance(grouping, list)
            or len(grouping) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grouping)
        ):
            raise ValueError(
                f"mem_attention_grouping={grouping!r} is malformed: give [heads_per_group, queries_per_group], "
                "two positive integers, or null."
            )
        if self.mem_attention_implementation not in MEM_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"mem_attention_implementation={self.mem_attention_implementation!r} is unknown; use one of "
                f"{list(MEM_ATTENTION_IMPLEMENTATIONS)}."
            )
        check_top_k(self.mem_top_k)
        if self.mem_index not in MEM_INDEXES:
            raise ValueError(f"mem_index={self.mem_index!r} is unknown; use one of {list(MEM_INDEXES)}.")
        if self.mem_keep_first < 0:
            raise ValueError(f"mem_keep_first={self.mem_keep_first} must be >= 0.")
        if self.mem_max_tokens is not None and self.mem_max_tokens - self.mem_keep_first < self.max_position_embeddings:
            raise ValueError(
                f"mem_max_tokens={self.mem_max_tokens} leaves less than one window (max_position_embeddings="
                f"{self.max_position_embeddings}) after the mem_keep_first={self.mem_keep_first} kept entries: a "
                "window written to memory would evict itself. Use mem_max_tokens >= "
                f"{self.max_position_embeddings + self.mem_keep_first}, or null for unbounded memory."
            )
        if self.last_context_length < 1:
            raise ValueError(f"last_context_length={self.last_context_length} must be a positive number of tokens.")
        if self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings} must be positive.")
        if self.gradient_checkpoint_every_ith < 1:
            raise ValueError(f"gradient_checkpoint_every_ith={self.gradient_checkpoint_every_ith} must be >= 1.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )


def check_top_k(mem_top_k) -> None:
    """`mem_top_k` is None (dense) or a positive int."""
    if mem_top_k is not None and (isinstance(mem_top_k, bool) or not isinstance(mem_top_k, int) or mem_top_k < 1):
        raise ValueError(
            f"mem_top_k={mem_top_k!r} must be a positive number of memory keys per query, or None to attend to all "
            "of memory."
        )


__all__ = ["LongLlamaConfig", "check_top_k"]
