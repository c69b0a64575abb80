"""The training state of `longllama-train` checkpoints, in safetensors and JSON only (docs/training.md#checkpoints).

accelerate's `save_state` pickles the optimizer, the scheduler, the RNG states and every registered object with
`torch.save`, and `load_state` unpickles them (`weights_only=False`): loading a checkpoint could run code planted in
it. This module writes the same state as tensors and plain data, and a resume refuses any file of a pickle format:

- `model.safetensors`: the model's weights (tied weights once);
- `optimizer.safetensors` + `optimizer.json`: each parameter's state tensors (AdamW's `exp_avg`, `exp_avg_sq`, `step`)
  and the parameter groups (learning rate, betas, ...);
- `trainer_state.json` (written by the trainer) takes `scheduler` (its `state_dict`, numbers only), `scaler` (fp16's
  gradient scaler) and `accelerator_step` from `train_state()`;
- `rng-rankR.json` + `rng-rankR.safetensors`: Python's, numpy's and torch's (CPU and CUDA) generators of process R.

It covers one process and DDP, where every process holds the whole model and optimizer. FSDP and DeepSpeed shard
them and have only pickled formats: `check_engine` refuses resumable checkpoints there.
"""

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model

from .files import read_regular_file, save_safetensors

PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
JSON_LIMIT = 256 << 20  # bytes; optimizer.json of a large model's parameter groups is far smaller
SHARDED_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def whole_state(distributed_type) -> bool:
    """Whether every process holds the whole model and optimizer (one process or DDP), which resuming needs."""
    return getattr(distributed_type, "name", str(distributed_type)) not in SHARDED_ENGINES


def check_engine(distributed_type) -> None:
    """Refuse resumable checkpoints under an engine that shards the model or optimizer (FSDP, DeepSpeed)."""
    name = getattr(distributed_type, "name", str(distributed_type))
    if not whole_state(distributed_type):
        raise ValueError(
            f"Resumable checkpoints are not available under {name}: its optimizer state is sharded and saved only as "
            "pickles, which longllama-train never writes nor loads. Pass --save-every 0 (the final model is still "
            "saved), or train with DDP."
        )


def check_no_pickles(directory: Path) -> None:
    """Refuse a checkpoint holding a file of a pickle format (an older checkpoint's, or a planted one)."""
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(
                f"{path} is a pickle file, which could run code when loaded; longllama-train checkpoints hold none "
                "(safetensors and JSON only). Resume from a checkpoint written by this version, or remove the file."
            )


def save_state(directory: Path, *, model, optimizer, rank: int, main: bool) -> None:
    """Write this process's RNG states, and on the main process the model and the optimizer, into `directory`."""
    rng_json, rng_tensors = rng_state()
    (directory / f"rng-rank{rank}.json").write_text(json.dumps(rng_json))
    save_safetensors(rng_tensors, directory / f"rng-rank{rank}.safetensors")
    if not main:
        return
    try:
        save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    except Exception as error:  # safetensors' own errors (a full disk) as the OSError every other write raises
        raise OSError(f"cannot write {directory / 'model.safetensors'}: {error}") from error
    groups, tensors, scalars = optimizer_state(optimizer)
    save_safetensors(tensors, directory / "optimizer.safetensors")
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": scalars}))


def train_state(scheduler, scaler, accelerator_step: int) -> dict:
    """What `trainer_state.json` keeps of the scheduler, the fp16 gradient scaler and accelerate's step counter."""
    return {
        "scheduler": scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "accelerator_step": accelerator_step,
    }


def load_state(directory: Path, state: dict, *, model, optimizer, scheduler, scaler, rank: int) -> int:
    """Restore what `save_state` and `train_state` saved; returns accelerate's step counter. Every process loads the
    model and optimizer files (they are the same for all) and its own RNG file."""
    from safetensors import SafetensorError

    check_no_pickles(directory)
    try:
        load_model(model, str(directory / "model.safetensors"), strict=True)
        optimizer_json = read_json(directory / "optimizer.json")
        optimizer.load_state_dict(optimizer_state_dict(optimizer_json, load_file(directory / "optimizer.safetensors")))
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        rng = read_json(directory / f"rng-rank{rank}.json"), load_file(directory / f"rng-rank{rank}.safetensors")
        set_rng_state(*rng)
        return int(state.get("accelerator_step", 0))
    except (SafetensorError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{directory} is not a whole checkpoint ({type(error).__name__}: {error}): resume from "
                         "another one.".replace("\n", " ")) from error


def read_json(path: Path):
    return json.loads(read_regular_file(path, JSON_LIMIT))


# ---------------------------------------------------------------------------------------------------------------------
# optimizer


def optimizer_state(optimizer) -> tuple[list, dict, dict]:
    """(param_groups as JSON, state tensors `{"param.name": tensor}`, other state values `{"param.name": number}`)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{name}"] = value
    groups = [{key: _jsonable(value) for key, value in group.items()} for group in state["param_groups"]]
    return groups, tensors, scalars


def optimizer_state_dict(saved: dict, tensors: dict) -> dict:
    """The `optimizer.state_dict()` that `optimizer_state` wrote."""
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *saved["scalars"].items()]:
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    groups = [{key: _restored(value) for key, value in group.items()} for group in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _jsonable(value):
    """Tuples (AdamW's betas) are written as {"tuple": [...]} so that they come back as tuples."""
    if isinstance(value, tuple):
        return {"tuple": [_jsonable(v) for v in value]}
    if torch.is_tensor(value):
        return value.item()
    return value


def _restored(value):
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_restored(v) for v in value["tuple"])
    return value


# ---------------------------------------------------------------------------------------------------------------------
# random number generators


def rng_state() -> tuple[dict, dict]:
    """(Python's and numpy's generator states as JSON, torch's as tensors) of this process."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), position, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    import numpy as np

    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


__all__ = ["check_engine", "check_no_pickles", "load_state", "save_state", "train_state", "whole_state"]
