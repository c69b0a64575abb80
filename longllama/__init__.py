"""LongLLaMA: the Focused Transformer (arXiv 2307.03170) on Hugging Face transformers.

`import longllama` registers the `"longllama"` model type with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`,
so LongLLaMA checkpoints (ours and the published ones) load with our classes, and `AutoTokenizer` knows
`LongLlamaTokenizer`, and plugs the package's faster and optional kNN backends into the checkpoint code
(`search.py`, `hnsw.py`). `demo_checkpoint()` is the directory of the bundled demo model.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from . import attention, crossbatch, hnsw, search, session
from .demo import demo_checkpoint
from .modeling import LongLlamaCache, LongLlamaConfig, LongLlamaForCausalLM, LongLlamaModel, LongLlamaTokenizer
from .modeling import attention_longllama, cache_longllama, modeling_longllama
from .modeling.knn_longllama import INDEX_BACKENDS

AutoConfig.register(LongLlamaConfig.model_type, LongLlamaConfig, exist_ok=True)
AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)
AutoTokenizer.register(LongLlamaConfig, slow_tokenizer_class=LongLlamaTokenizer, exist_ok=True)
# What the package plugs into the checkpoint code (docs/architecture.md): faster and optional kNN backends, faster
# memory attention while decoding, saved sessions and crossbatch training.
INDEX_BACKENDS.update(exact=search.ExactIndex, faiss=hnsw.FaissIndex, hnswlib=hnsw.HnswlibIndex)
attention_longllama.MEMORY_ATTENTION_FUNCTIONS["blockwise"] = attention.blockwise_memory_attention_forward
cache_longllama.SESSION_STORE = session
modeling_longllama.CROSS_BATCH = crossbatch

__version__ = "0.1.0"

__all__ = [
    "LongLlamaCache",
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "LongLlamaTokenizer",
    "__version__",
    "demo_checkpoint",
]
