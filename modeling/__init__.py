"""Remote-code files of LongLLaMA (copied into every checkpoint directory; installed as `longllama.modeling`)."""

from .configuration_longllama import LongLlamaConfig
from .cache_longllama import LongLlamaCache
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
