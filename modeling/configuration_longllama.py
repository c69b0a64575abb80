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

# The code files that ship in every checkpoint directory (see `save_pretrained`).
AUTO_MAP = {
    "AutoConfig": "configuration_longllama.LongLlamaConfig",
    "AutoModel": "modeling_longllama.LongLlamaModel",
    "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
}


@config_class
class LongLlamaConfig(LlamaConfig):
    r"""
    Configuration of a LongLLaMA model (Focused Transformer, arXiv 2307.03170): a Llama decoder whose
    `mem_layers` attend to their local window plus an external memory of (key, value) pairs.

    Args beyond [`LlamaConfig`]:
        mem_layers (`list[int]`, defaults to `[]`):
            0-based indices of the decoder layers with memory; `[]` turns memory off.
        mem_positionals (`bool`, defaults to `True`):
            If `False`, memory layers use no rotary encoding at all (local keys and queries included).
        mem_dtype (`str`, defaults to `"bfloat16"`):
            Name of the torch dtype in which memory keys and values are stored. They are cast back to the compute
            dtype when read, so with `"bfloat16"` memory is bf16-rounded even in an fp32 model. `"int8"` stores
            every key and value vector as int8 with a float16 absmax scale (an approximation: about 0.4% error).
        mem_top_k (`int`, *optional*):
            kNN retrieval: each memory-layer query attends to its local context plus its `mem_top_k` memory keys of
            highest inner product (per query head, searched among its KV head's keys), in the same softmax. `None`
            (the published behaviour) attends to all of memory. Also a `forward` / `generate` argument. With
            `mem_top_k` at least the memory size the result is exactly the dense one. Crossbatch training is dense.
        mem_index (`str`, defaults to `"exact"`):
            Top-k search backend: `"exact"` (blockwise matmul + top-k in torch), or the approximate `"faiss"` /
            `"hnswlib"` (HNSW graphs; `pip install "longllama[faiss]"` / `"longllama[hnswlib]"`).
        mem_index_options (`dict`, *optional*):
            Options of the backend, e.g. `{"M": 32, "ef_search": 4096}` for the HNSW backends.
        mem_max_tokens (`int`, *optional*):
            Bound on the entries each memory layer keeps (per row, padding included). Beyond it the oldest entries
            are evicted first-in first-out, except the first `mem_keep_first`. At least one window plus
            `mem_keep_first`. `None`: memory grows without bound (the published behaviour).
        mem_keep_first (`int`, defaults to 0):
            With `mem_max_tokens`: the first this-many memory entries of a session are never evicted.
        mem_device (`str`, *optional*):
            Device of the memory (e.g. `"cpu"` to offload a GPU model's memory to host RAM; top-k search runs there
            and only the selected values move). Default: each layer's memory lives on that layer's device.
        mem_attention_grouping (`list[int]`, *optional*):
            `[heads_per_group, queries_per_group]`: the published way of bounding the memory of memory attention.
            It is mathematically a no-op; only the `"eager"` kernel uses it (the default kernel is blockwise).
        mem_attention_implementation (`str`, *optional*):
            Kernel of the memory layers: `"blockwise"` (default: memory in blocks with a running log-sum-exp, never
            materialising `[queries x memory]` scores), `"eager"` (the published dense computation, honours
            `mem_attention_grouping`) or `"sdpa"` (concatenated keys through `scaled_dot_product_attention`).
            All three compute the same function.
        last_context_length (`int`, defaults to 1024):
            The last this-many tokens of a long input form the final local window (they are not written to
            memory). Can be overridden per `forward` / `generate` call.
        torch_attention (`bool`, defaults to `False`):
            Published flag choosing `scaled_dot_product_attention` over eager attention. Kept for compatibility; it
            does not pick the kernel: the default `"blockwise"` kernel already runs on the fused SDPA kernel (on CPU)
            and, unlike a concatenating `"sdpa"` kernel, stays linear in the memory size at 100k+ tokens. Every kernel
            computes the same function; choose one with `mem_attention_implementation`.
        gradient_checkpoint_every_ith (`int`, defaults to 1):
            With gradient checkpointing on, checkpoint every i-th layer (`longllama-train` passes it to
            `activation_checkpointing_enable(every_n_layers=...)`).
        max_position_embeddings (`int`, defaults to 2048):
            Also the context window length: the size of prefill windows and the cap of the local cache.

    Example:

    ```python
    >>> from longllama import LongLlamaConfig
    >>> config = LongLlamaConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, mem_layers=[2, 5])
    ```
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

    @property
    def mem_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.mem_dtype)

    def validate_longllama(self):
        """Raise a `ValueError` naming the bad value of any LongLLaMA field (also called by the model)."""
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
