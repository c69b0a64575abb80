"""`longllama-train`: Focused Transformer (FoT) training of LongLLaMA on accelerate.

    longllama-train --model path/to/longllama --data docs/ --steps 1000 --output-dir run
    accelerate launch --multi_gpu --num_processes 2 -m longllama.train --config run.yaml  # DDP (GPUs, or gloo on CPU)

Every batch row is one window; in the memory layers each row also attends to earlier rows of the batch
(`longllama.crossbatch`): earlier segments of its own document (positives) and other documents (negatives), in one
softmax, with gradients. The loss is plain next-token cross-entropy. Two data layouts (`longllama.data`): `fot`
(k-packed document streams) and `memory` (memory fine-tuning: a random part of each example goes through memory).

Checkpoints (`output_dir/checkpoints/step-N`) hold the model, optimizer, scheduler, RNG and data position in
safetensors and JSON only (`longllama.checkpoint`: nothing is pickled, and a resume refuses pickle files), so
`--resume auto` continues exactly where the last one stopped; `output_dir/model` is a drop-in LongLLaMA checkpoint.
Both are written beside their path and renamed into place whole.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .cli import THREADS_HELP, start
from .files import atomic_directory, read_regular_file, replace_directory, save_safetensors

# torch, accelerate, the data pipeline and the model code are imported inside the functions that use them, so that the
# command parses its arguments (and answers `--help`) before loading them.

# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything a run needs. Load with `--config run.yaml` (or .json); command-line flags override it."""

    # model
    model: str | None = None  # LongLLaMA checkpoint to train (e.g. from longllama-convert)
    init_config: str | None = None  # or: a LongLLaMA config.json to train from scratch (random weights)
    tokenizer: str | None = None  # tokenizer directory (default: the model directory)
    # data
    data: list[str] = field(default_factory=list)  # .txt / .jsonl files or directories
    text_field: str = "text"  # field of the .jsonl objects holding the text
    mode: str = "fot"  # fot: k-packed crossbatch; memory: memory fine-tuning (negatives: memory_negatives)
    window: int | None = None  # tokens per row (default: the model's window, max_position_embeddings)
    batch_size: int = 8  # rows per process and micro-batch (crossbatch happens inside it)
    pack_size: int = 4  # k: consecutive rows holding consecutive segments of one document
    cross_batch_range: int = 3  # d: rows each row may see (0 = no crossbatch)
    stepping: bool = True  # the FoT stepping rule (mix of rows with few and many extra contexts)
    positives_only: bool = False  # memory holds only the same document's earlier rows (ablation)
    memory_negatives: bool = False  # --mode memory: rows also see up to d rows of other examples (negatives)
    cross_batch_schedule: str | None = None  # "STEP:D,...": d from STEP on (before the first: cross_batch_range)
    memory_bank: int = 0  # windows of earlier batches' keys and values each row also retrieves from (0: none)
    memory_bank_top_k: int = 8  # bank entries each query retrieves
    # optimisation (defaults: the published FoT fine-tuning recipe)
    steps: int = 1000  # optimizer steps
    lr: float = 2e-5
    weight_decay: float = 0.01
    lr_schedule: str = "constant"  # constant or cosine (to 10% of lr)
    warmup_steps: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # no, bf16 or fp16 (fp16 needs a GPU)
    gradient_checkpointing: bool = False  # every `gradient_checkpoint_every_ith` layer of the config, memory included
    seed: int = 0
    # output
    output_dir: str = "longllama-train-output"
    save_every: int = 500  # steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # steps between positive-attention-mass evaluations (0: never)
    eval_data: list[str] = field(default_factory=list)  # documents for it (default: the first training documents)
    eval_documents: int = 8
    eval_distractors: int = 3
    resume: str | None = None  # "auto" (latest checkpoint in output_dir) or a checkpoint directory
    threads: int | None = None  # torch CPU threads per process (default: OMP_NUM_THREADS, else one per core)
    evaluate: str | None = None  # only evaluate the positive attention mass of this checkpoint, then exit


CHECKPOINT_FORMAT = "longllama-train-checkpoint-2"  # 2: safetensors and JSON only (1 was accelerate's pickles)
# fields that must match for a checkpoint to be resumed: they decide the model and the exact data order
RESUME_KEYS = ("model", "init_config", "data", "text_field", "mode", "window", "batch_size", "pack_size",
               "cross_batch_range", "cross_batch_schedule", "stepping", "positives_only", "memory_negatives",
               "memory_bank", "memory_bank_top_k", "grad_accum", "seed")


def _field_type(f: dataclasses.Field):
    """The field's type without `| None`: str, int, float, bool or list[str]."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(name: str, value, kind):
    """A config-file value as its field's type (YAML reads `3e-3` as a string); ValueError naming the key."""
    if value is None:
        return None
    try:
        if typing.get_origin(kind) is list:
            return [str(v) for v in (value if isinstance(value, list) else [value])]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"Config option {name}: {value!r} is not a valid {getattr(kind, '__name__', kind)}.") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longllama-train",
        description="Train a LongLLaMA model with Focused Transformer crossbatch (single process, or under "
        "`accelerate launch` for DDP / FSDP / DeepSpeed). Give a config file and/or flags; flags win.",
        epilog="Example: longllama-train --model ./long_llama_3b --data corpus/ --steps 1000 --output-dir run. "
        "Resume an interrupted run with the same flags plus --resume auto. See docs/training.md.",
    )
    parser.add_argument("--config", help="YAML or JSON file with any of the options below")
    for f in dataclasses.fields(TrainConfig):
        kind, flag = _field_type(f), "--" + f.name.replace("_", "-")
        help_text = _help_with_default(f)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    return parser


def _help_with_default(f: dataclasses.Field) -> str:
    """The flag's help, ending with its default unless the help already says what the default is."""
    help_text = _HELP.get(f.name, "")
    if "(default" in help_text:
        return help_text
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default is None or default == []:
        default = "none"
    return f"{help_text} (default: {default})"


_HELP = {
    "model": "LongLLaMA checkpoint directory to train",
    "init_config": "config.json of a LongLLaMA to train from scratch (random init)",
    "tokenizer": "tokenizer directory (default: the model directory)",
    "data": ".txt files (one document each), .jsonl files (one per line) or directories of them",
    "text_field": "field of the .jsonl objects with the text",
    "mode": "fot: k-packed document streams with crossbatch negatives; memory: memory fine-tuning",
    "window": "tokens per batch row (default and maximum: the model's max_position_embeddings)",
    "batch_size": "rows per process and micro-batch",
    "pack_size": "k: consecutive rows holding consecutive segments of one document",
    "cross_batch_range": "d: how many earlier rows each row's memory layers see",
    "stepping": "FoT stepping rule for k-packed batches",
    "positives_only": "memory sees only earlier rows of the same document (no negatives)",
    "memory_negatives": "with --mode memory: rows also see rows of other examples (negatives), up to "
    "--cross-batch-range rows by the FoT stepping rule (d >= pack_size - 1: every row still sees its whole example)",
    "cross_batch_schedule": "raise d during training, as the paper's small models: '500:7,1000:15' uses "
    "--cross-batch-range until step 500, then d=7, from step 1000 d=15 (negatives make the retrieval harder to "
    "learn from scratch; start with few)",
    "memory_bank": "negatives beyond the batch: every row's memory also holds, without gradients, the entries it "
    "retrieves from the keys and values that the last N windows of earlier batches wrote (N * window tokens), as kNN "
    "retrieval from a long memory does at inference; needs negatives (--mode fot, or --mode memory "
    "--memory-negatives); 0: off",
    "memory_bank_top_k": "bank entries each query retrieves (a row gets the union over its queries)",
    "steps": "optimizer steps to train for",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay (not applied to norms)",
    "lr_schedule": "constant or cosine",
    "warmup_steps": "linear warm-up steps",
    "grad_accum": "micro-batches per optimizer step",
    "max_grad_norm": "gradient clipping (0: off)",
    "mixed_precision": "no, bf16 or fp16",
    "gradient_checkpointing": "recompute activations in the backward pass (memory layers included)",
    "seed": "random seed (initialisation and data)",
    "output_dir": "where checkpoints, logs and the final model go",
    "save_every": "steps between resumable checkpoints (0: only at the end)",
    "keep_checkpoints": "resumable checkpoints to keep",
    "log_every": "steps between log lines (loss, tokens/s, lr)",
    "eval_every": "steps between positive-attention-mass evaluations (0: never)",
    "eval_data": "documents for the evaluation (default: the first training documents)",
    "eval_documents": "documents used by the evaluation",
    "eval_distractors": "unrelated windows in memory during the evaluation",
    "resume": "'auto' (latest checkpoint in output_dir) or a checkpoint directory",
    "evaluate": "only print the positive attention mass of this checkpoint on --data, then exit",
    "threads": THREADS_HELP,
}


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Config file, then command-line overrides. Unknown keys in the file are an error."""
    args = build_parser().parse_args(argv)
    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"Config file {path} does not exist.")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown option(s) in {path}: {', '.join(unknown)}. Valid: {', '.join(sorted(names))}.")
    for name, value in vars(args).items():
        if name != "config" and value is not None:
            values[name] = value
    kinds = {f.name: _field_type(f) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: _coerce(name, value, kinds[name]) for name, value in values.items()})


def check_config(cfg: TrainConfig) -> None:
    """Errors a run would otherwise hit late, raised before anything is loaded or computed."""
    if (cfg.model is None) == (cfg.init_config is None) and cfg.evaluate is None:
        raise ValueError("Pass exactly one of --model (a checkpoint to train) or --init-config (train from scratch).")
    for path in (cfg.model, cfg.evaluate):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory (no config.json).")
    if cfg.init_config is not None and not Path(cfg.init_config).is_file():
        raise ValueError(f"--init-config {cfg.init_config} does not exist.")
    if not cfg.data:
        raise ValueError("Pass training documents with --data (files or directories).")
    if cfg.mode not in ("fot", "memory"):
        raise ValueError(f"--mode {cfg.mode!r}: use 'fot' (k-packing crossbatch) or 'memory' (memory fine-tuning).")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"--lr-schedule {cfg.lr_schedule!r}: use 'constant' or 'cosine'.")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"--mixed-precision {cfg.mixed_precision!r}: use 'no', 'bf16' or 'fp16'.")
    for name in ("steps", "batch_size", "pack_size", "grad_accum", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    if cfg.memory_negatives and cfg.mode != "memory":
        raise ValueError("--memory-negatives adds other examples to the memory of --mode memory; --mode fot has "
                         "negatives already.")
    if cfg.memory_bank < 0 or cfg.memory_bank_top_k < 1:
        raise ValueError(f"--memory-bank must be at least 0 and --memory-bank-top-k at least 1, got {cfg.memory_bank} "
                         f"and {cfg.memory_bank_top_k}.")
    if cfg.memory_bank and (cfg.positives_only or (cfg.mode == "memory" and not cfg.memory_negatives)):
        raise ValueError("--memory-bank adds other documents' keys to memory: it needs negatives (--mode fot "
                         "without --positives-only, or --mode memory --memory-negatives).")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {cfg.threads}.")
    cross_batch_schedule(cfg)


def cross_batch_schedule(cfg: TrainConfig) -> list[tuple[int, int]]:
    """`--cross-batch-schedule` as `[(step, d), ...]`, checked: steps increasing, d at least 0, only where there are
    negatives (--mode fot, or --mode memory --memory-negatives)."""
    if not cfg.cross_batch_schedule:
        return []
    if cfg.mode != "fot" and not cfg.memory_negatives:
        raise ValueError("--cross-batch-schedule raises d of FoT crossbatch: it needs --mode fot (or --mode memory "
                         "with --memory-negatives).")
    schedule = []
    for item in cfg.cross_batch_schedule.replace(" ", "").split(","):
        try:
            step, d = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(
                f"--cross-batch-schedule {cfg.cross_batch_schedule!r}: expected STEP:D pairs separated by commas, "
                "e.g. '500:7,1000:15' (d=7 from step 500, d=15 from step 1000)."
            ) from None
        if d < 0 or step < 0 or (schedule and step <= schedule[-1][0]):
            raise ValueError(
                f"--cross-batch-schedule {cfg.cross_batch_schedule!r}: steps must increase and steps and d must be "
                "at least 0."
            )
        schedule.append((step, d))
    return schedule


def cross_batch_range_at(cfg: TrainConfig, schedule: list[tuple[int, int]], step: int) -> int:
    """d for the optimizer step that starts at `step` (0-based)."""
    d = cfg.cross_batch_range
    for start, value in schedule:
        if step >= start:
            d = value
    return d


def load_model_config(cfg: TrainConfig):
    from .modeling import LongLlamaConfig

    path = cfg.model or cfg.evaluate
    config = LongLlamaConfig.from_pretrained(path) if path else LongLlamaConfig.from_json_file(cfg.init_config)
    if not config.mem_layers:
        raise ValueError("The model has no memory layers (mem_layers is empty): there is nothing for FoT to train.")
    window = cfg.window or config.max_position_embeddings
    if window > config.max_position_embeddings:
        raise ValueError(
            f"--window {window} is longer than the model's window (max_position_embeddings = "
            f"{config.max_position_embeddings}): a training row must fit in one local context."
        )
    if window < 2:
        raise ValueError(f"--window {window}: rows need at least 2 tokens.")
    return config, window


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted((output_dir / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def resolve_resume(cfg: TrainConfig, world_size: int) -> Path | None:
    """The checkpoint to resume from, checked against this run's config and process count."""
    from .checkpoint import check_no_pickles
    if cfg.resume is None:
        return None
    path = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return None  # auto with nothing saved yet: a fresh start
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise ValueError(f"{path} is not a longllama-train checkpoint (no trainer_state.json).")
    check_no_pickles(path)
    state = read_trainer_state(path)
    # options newer than the checkpoint count as their default there
    saved, now = {**dataclasses.asdict(TrainConfig()), **state["config"]}, dataclasses.asdict(cfg)
    different = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if different:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in different)
        raise ValueError(f"Cannot resume {path}: it was made with another configuration ({detail}).")
    if state["world_size"] != world_size:
        raise ValueError(
            f"Cannot resume {path}: it was saved by {state['world_size']} processes and this run has {world_size}; "
            "the data position is per process."
        )
    return path


def read_trainer_state(path: Path) -> dict:
    """`trainer_state.json` of the checkpoint `path`, of this version's format."""
    try:
        state = json.loads(read_regular_file(path / "trainer_state.json", 64 << 20))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path / 'trainer_state.json'} cannot be read ({error}).") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a checkpoint of an older longllama-train (its state was pickled): start again, "
                         "or resume with the version that wrote it.")
    return state


def load_bank(bank, path: Path, device) -> None:
    """Fill `bank` from a resumable checkpoint's `bank-rankR.safetensors` (safetensors: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        bank.load_state_dict(load_file(path, device=str(device)))
    except (OSError, SafetensorError, KeyError, ValueError) as error:
        raise ValueError(f"{path.parent} has no whole {path.name} ({type(error).__name__}: {error}): it was saved "
                         "without --memory-bank, or is damaged; resume from another checkpoint.") from error


def save_checkpoint(accelerator, cfg: TrainConfig, step: int, batches, tokens_seen: int, model, optimizer, scheduler,
                    bank=None):
    """Write `checkpoints/step-N` whole or not at all (a partial directory renamed into place at the end; partial
    directories a killed run left are removed first), then prune old ones."""
    from .checkpoint import save_state, train_state
    root = Path(cfg.output_dir) / "checkpoints"
    final, partial = root / f"step-{step}", root / f"step-{step}.partial"
    if accelerator.is_main_process:
        for stale in [*root.glob("step-*.partial"), *root.glob("step-*.deleting")]:  # one writer per output_dir
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(partial, model=accelerator.unwrap_model(model), optimizer=optimizer, rank=accelerator.process_index,
               main=accelerator.is_main_process)
    (partial / f"data-rank{accelerator.process_index}.json").write_text(json.dumps(batches.state_dict()))
    if bank is not None:
        bank_file = partial / f"bank-rank{accelerator.process_index}.safetensors"
        save_safetensors({k: v.cpu() for k, v in bank.state_dict().items()}, bank_file)  # a full disk: OSError
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"format": CHECKPOINT_FORMAT, "step": step, "tokens_seen": tokens_seen,
                 "world_size": accelerator.num_processes, "config": dataclasses.asdict(cfg),
                 **train_state(scheduler, accelerator.scaler, accelerator.step)}
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=2))
        replace_directory(partial, final)
        for old in sorted(root.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))[: -cfg.keep_checkpoints]:
            doomed = old.with_name(f"{old.name}.deleting")  # renamed first: never a half-deleted step-N
            os.rename(old, doomed)
            shutil.rmtree(doomed)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------------
# Training


def make_batches(cfg: TrainConfig, tokenizer, window: int, rank: int, world_size: int, pad_token_id: int):
    from .data import DocumentSource, MemoryFineTuningBatches, PackedBatches, TokenStream

    stream = TokenStream(DocumentSource(files=cfg.data, text_field=cfg.text_field), tokenizer, rank, world_size)
    d = cfg.cross_batch_range
    if cfg.mode == "memory":
        d = d if cfg.memory_negatives else None  # None: only the earlier rows of the example's own pack
        batches = MemoryFineTuningBatches(stream, cfg.batch_size, window, cfg.pack_size, cfg.seed + rank,
                                          pad_token_id, d)
    else:
        batches = PackedBatches(stream, cfg.batch_size, window, cfg.pack_size, d, cfg.stepping, cfg.positives_only)
    for _, scheduled in cross_batch_schedule(cfg):  # every scheduled d must fit the batch: fail now, not at that step
        batches.set_cross_batch_range(scheduled)
    batches.set_cross_batch_range(d)
    return batches


def eval_documents(cfg: TrainConfig, tokenizer, window: int) -> list[list[int]]:
    """Documents of at least two windows for the positive-attention-mass evaluation."""
    from .data import DocumentSource, encode_document

    source = DocumentSource(files=cfg.eval_data or cfg.data, text_field=cfg.text_field)
    documents = []
    for text in source:
        ids = encode_document(tokenizer, text)
        if len(ids) >= 2 * window:
            documents.append(ids)
        if len(documents) == cfg.eval_documents:
            break
    if len(documents) < 2:
        raise ValueError(f"The evaluation needs at least 2 documents of {2 * window}+ tokens; found {len(documents)}.")
    return documents


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _has_accelerator() -> bool:
    import torch

    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def next_token_loss(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Mean cross-entropy over the tokens that have a target (`targets` are already shifted; -100: none)."""
    import torch.nn.functional as F

    from .data import IGNORE_INDEX

    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the directory of the final drop-in checkpoint."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging  # its bars honour transformers' `disable_progress_bar()`

    from .checkpoint import check_engine, load_state, whole_state
    from .crossbatch import MemoryBank, set_memory_bank
    from .data import load_tokenizer
    from .evaluation import positive_attention_mass
    from .modeling import LongLlamaForCausalLM

    # ---- checks, before anything heavy
    check_config(cfg)
    config, window = load_model_config(cfg)
    accelerator = Accelerator(
        # without a GPU, processes started by torchrun (`accelerate launch --multi_gpu`) form a gloo DDP group on CPU
        cpu=not _has_accelerator(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,  # accelerate divides the loss and skips syncs in between
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
    )
    if not _has_accelerator() and any(
        os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true" for engine in ("FSDP", "DEEPSPEED")
    ):
        accelerator.print("longllama-train: warning: FSDP and DeepSpeed need GPUs; without one this runs plain DDP.")
    resumable = whole_state(accelerator.distributed_type)
    if not resumable and (cfg.save_every or cfg.resume):
        check_engine(accelerator.distributed_type)  # raises: resumable checkpoints need the whole state per process
    resume_from = resolve_resume(cfg, accelerator.num_processes)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model or Path(cfg.init_config).parent)
    batches = make_batches(cfg, tokenizer, window, accelerator.process_index, accelerator.num_processes,
                           config.pad_token_id or 0)

    # ---- model and optimizer
    set_seed(cfg.seed)
    # fp32 master weights whatever the checkpoint's dtype; --mixed-precision computes in bf16/fp16 under autocast
    model = (LongLlamaForCausalLM.from_pretrained(cfg.model, dtype=torch.float32) if cfg.model
             else LongLlamaForCausalLM(config))
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(every_n_layers=max(1, config.gradient_checkpoint_every_ith))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is ours to save (no pickles)

    # negatives beyond the batch, per process (docs/training.md#memory-bank)
    bank = MemoryBank(cfg.memory_bank * window, cfg.memory_bank_top_k) if cfg.memory_bank else None
    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        accelerator.step = load_state(resume_from, state, model=accelerator.unwrap_model(model), optimizer=optimizer,
                                      scheduler=scheduler, scaler=accelerator.scaler, rank=accelerator.process_index)
        data_file = resume_from / f"data-rank{accelerator.process_index}.json"
        batches.load_state_dict(json.loads(data_file.read_text()))
        if bank is not None:
            load_bank(bank, resume_from / f"bank-rank{accelerator.process_index}.safetensors", accelerator.device)
        step, tokens_seen = state["step"], state["tokens_seen"]
        accelerator.print(f"Resumed from {resume_from} at step {step}.")
    eval_docs = eval_documents(cfg, tokenizer, window) if cfg.eval_every else None
    log_file = Path(cfg.output_dir) / "log.jsonl"
    if accelerator.is_main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)

    # ---- loop
    schedule = cross_batch_schedule(cfg)  # [] in memory mode without --memory-negatives (check_config refuses one)
    # a bar on the main process's terminal only (`disable=None`: none when stderr is a file or pipe)
    progress = logging.tqdm(total=cfg.steps, initial=step, desc="longllama-train",
                            disable=None if accelerator.is_main_process else True)
    window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
    previous_bank = set_memory_bank(bank)  # None: no bank
    try:
        while step < cfg.steps:
            if schedule:
                batches.set_cross_batch_range(cross_batch_range_at(cfg, schedule, step))
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
                with accelerator.accumulate(model), accelerator.autocast():
                    logits = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        cross_batch_rows=batch["cross_batch_rows"],
                        use_cache=False,
                    ).logits
                    loss = next_token_loss(logits, batch["targets"])
                    accelerator.backward(loss)
                    if bank is not None:
                        bank.commit()  # this micro-batch's keys join the bank for the next ones
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()  # a no-op until the last micro-batch (accelerate, DeepSpeed)
                    optimizer.zero_grad(set_to_none=True)
                window_loss += loss.item() / cfg.grad_accum
                window_tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            scheduler.step()
            step, window_steps = step + 1, window_steps + 1
            progress.update(1)

            # ---- logging, evaluation, checkpoints
            if step % cfg.log_every == 0 or step == cfg.steps:
                seconds = time.perf_counter() - window_start
                window_loss = accelerator.reduce(torch.tensor(window_loss, device=accelerator.device), "mean").item()
                tokens_seen += window_tokens
                record = {"step": step, "loss": window_loss / window_steps, "tokens_per_s": window_tokens / seconds,
                          "lr": scheduler.get_last_lr()[0], "tokens_seen": tokens_seen}
                if schedule:
                    record["cross_batch_range"] = batches.cross_batch_range
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and accelerator.is_main_process:
                    mass = positive_attention_mass(accelerator.unwrap_model(model), eval_docs, cfg.eval_distractors,
                                                   window)
                    record["positive_attention_mass"] = mass["positive"]
                    record["memory_positive_share"] = mass["memory_positive"]
                if accelerator.is_main_process:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint(accelerator, cfg, step, batches, tokens_seen + window_tokens, model, optimizer,
                                scheduler, bank)
    except KeyboardInterrupt:
        accelerator.print(
            f"\nInterrupted at step {step}. Checkpoints are written atomically: rerun with --resume auto to continue "
            "from the last one."
        )
        raise
    finally:
        set_memory_bank(previous_bank)
        progress.close()

    # ---- final checkpoints: resumable state (one process or DDP) and a drop-in model
    if resumable:
        save_checkpoint(accelerator, cfg, step, batches, tokens_seen + window_tokens, model, optimizer, scheduler, bank)
    final = Path(cfg.output_dir) / "model"
    state_dict = accelerator.get_state_dict(model)  # every process takes part (FSDP / ZeRO-3 gather the shards)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True
        with atomic_directory(final, mode=0o755) as partial:  # the previous model stays whole until this one is in
            unwrapped.save_pretrained(partial, state_dict=state_dict)
            tokenizer.save_pretrained(partial)
    accelerator.wait_for_everyone()
    accelerator.print(f"Final model: {final}")
    return final


def evaluate(cfg: TrainConfig) -> dict:
    """`--evaluate CHECKPOINT`: the positive attention mass on `--data` with `--eval-distractors` in memory."""
    import torch

    from .data import load_tokenizer
    from .evaluation import positive_attention_mass
    from .modeling import LongLlamaForCausalLM

    check_config(cfg)
    config, window = load_model_config(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.evaluate)
    documents = eval_documents(cfg, tokenizer, window)
    model = LongLlamaForCausalLM.from_pretrained(cfg.evaluate, dtype=torch.float32)
    return positive_attention_mass(model, documents, cfg.eval_distractors, window)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
        check_config(cfg)  # argument errors before torch and transformers load
        start(cfg.threads)
        if cfg.evaluate:
            result = evaluate(cfg)
            print(json.dumps({"distractors": cfg.eval_distractors, **result}))
        else:
            train(cfg)
    except (ValueError, OSError) as error:  # bad input, or a write that failed (checkpoints stay whole)
        print(f"longllama-train: error: {error}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
