"""Remote-code files of LongLLaMA (copied into every checkpoint directory; installed as `longllama.modeling`)."""

from .cache_longllama import LongLlamaCache
from .configuration_longllama import LongLlamaConfig
from .modeling_longllama import LongLlamaForCausalLM, LongLlamaModel, LongLlamaPreTrainedModel
from .tokenization_longllama import LongLlamaTokenizer

__all__ = [
    "LongLlamaCache",
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "LongLlamaPreTrainedModel",
    "LongLlamaTokenizer",
]
