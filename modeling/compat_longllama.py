"""Shims that let a checkpoint's remote code run on transformers 4.57 and 5.0 to 5.23 as on the pinned 5.24.

Each shim names the versions it is for; on 5.24 every one is a no-op. `tests/compat` checks them (`.ci/compat`).
"""

import dataclasses
import functools
import inspect

from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.utils.deprecation import deprecate_kwarg

# transformers < 5.24: model outputs, decoder layers and generate() call the cache `past_key_values`, not `cache`
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# transformers 4.57 and 5.0: configs take their fields in `__init__`; from 5.10 they are `@strict` dataclasses
STRICT_CONFIGS = dataclasses.is_dataclass(LlamaConfig)
# transformers 4.57: `rope_theta` and `rope_scaling` instead of `rope_parameters`
ROPE_THETA = "rope_theta" in inspect.signature(LlamaConfig.__init__).parameters


def with_cache(output_class, cache, **fields):
    """`output_class(cache=cache, **fields)`, under the installed transformers' name of the cache field."""
    return output_class(**fields, **{CACHE_NAME: cache})


def accepts_past_key_values(forward):
    """`forward(past_key_values=...)` means `cache=`: deprecated from 5.24, the name generate() passes before."""
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_with_cache(*args, past_key_values=None, **kwargs):
        kwargs.setdefault("cache", past_key_values)
        return forward(*args, **kwargs)

    return forward_with_cache


def config_class(cls):
    """`@strict` on a config whose fields are annotated class attributes (5.10+). Before 5.10 (4.57, 5.0), an
    `__init__` that takes those fields, runs `LlamaConfig.__init__` on the others, then `cls.__post_init__`."""
    if STRICT_CONFIGS:
        from huggingface_hub.dataclasses import strict

        return strict(cls)
    defaults = {name: cls.__dict__[name] for name in cls.__annotations__}

    def __init__(self, **kwargs):
        for name, default in defaults.items():
            value = default.default_factory() if isinstance(default, dataclasses.Field) else default
            setattr(self, name, kwargs.pop(name, value))
        rope = kwargs.get("rope_parameters")
        if ROPE_THETA and rope:
            kwargs.update(rope_theta=rope["rope_theta"], rope_scaling=None if rope["rope_type"] == "default" else rope)
        LlamaConfig.__init__(self, **kwargs)
        self.__post_init__()

    cls.__init__ = __init__
    return cls


__all__ = ["CACHE_NAME", "STRICT_CONFIGS", "accepts_past_key_values", "config_class", "with_cache"]
