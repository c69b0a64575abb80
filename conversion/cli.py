"""`longllama-convert` (also `python -m longllama.conversion`): the converter's command line.

The parser is built and the arguments parsed before torch, transformers and the converter (`convert.py`) load, so
`--help` and argument errors answer at once.

    longllama-convert ./open_llama_3b ./long_open_llama_3b --mem-layers 6,12,18
"""

import argparse
import sys
from pathlib import Path

from longllama.cli import add_threads_flag, start

# The parser's choices, written out because convert.DTYPES and configuration_longllama.MEM_DTYPES live in modules that
# import torch; tests/test_conversion.py checks that they are the same.
DTYPES = ("keep", "bfloat16", "float16", "float32")
MEM_DTYPES = ("bfloat16", "float16", "float32", "float64", "int8")
MEMORY_OPTIONS = ("mem_layers", "last_context_length", "mem_dtype", "window")  # not with --to-llama


def parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices such as 6,12,18")


def build_parser() -> argparse.ArgumentParser:
    invoked_as = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(
        prog="python -m longllama.conversion" if invoked_as == "__main__.py" else invoked_as,
        description=(
            "Turn a local Hugging Face Llama checkpoint directory (e.g. OpenLLaMA 3B/7B) into a LongLLaMA checkpoint "
            "that loads with AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True). Weights are copied "
            "shard by shard (memory layers add no parameters); DST appears only when the conversion is complete."
        ),
        epilog=(
            "Example: python -m longllama.conversion ./open_llama_3b ./long_open_llama_3b --mem-layers 6,12,18. "
            "Default memory layers: [6,12,18] for 26 layers of hidden 3200 (OpenLLaMA 3B), [8,16,24] for 32 layers "
            "of hidden 4096 (7B), otherwise floor(n*k/4) for k=1,2,3 with n layers; a longllama source keeps its own."
        ),
    )
    parser.add_argument("src", type=Path, help="source checkpoint directory (config.json + weights)")
    parser.add_argument("dst", type=Path, help="output directory (must not exist unless --force)")
    parser.add_argument("--mem-layers", type=parse_layers, help="0-based memory layers, comma-separated: 6,12,18")
    parser.add_argument("--last-context-length", type=int, help="tokens of the final local window, at most the "
                        "window (default: a longllama source's, else 1024 or the window if shorter)")
    parser.add_argument("--mem-dtype", choices=MEM_DTYPES, help="dtype of stored memory keys/values (default bfloat16)")
    parser.add_argument("--window", type=int, help="context window = max_position_embeddings (default: source's)")
    parser.add_argument("--dtype", choices=DTYPES, default="keep", help="cast the weights (default: keep)")
    parser.add_argument("--shard-size", default="2GB", help="maximum output shard size, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the config.json; write nothing")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after writing, load SRC and DST in float32 and compare their logits on min(32, last_context_length) "
        "random tokens; fail if the max abs difference exceeds 1e-4 (default: on when 2 x the fp32 model size is "
        "under 50%% of available memory and --dtype does not cast to bfloat16/float16)",
    )
    parser.add_argument(
        "--to-llama",
        action="store_true",
        help="reverse direction: SRC is a LongLLaMA checkpoint and DST becomes a plain Llama checkpoint "
        "(LlamaForCausalLM, no code files); --mem-layers, --last-context-length, --mem-dtype and --window do not apply",
    )
    add_threads_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to_llama:
        bad = [f"--{name.replace('_', '-')}" for name in MEMORY_OPTIONS if getattr(args, name) is not None]
        if bad:
            parser.error(f"{', '.join(bad)} cannot be used with --to-llama")
    start(args.threads)
    from .convert import ConversionError, convert
    from .to_llama import to_llama
    from .verify import should_verify_by_default, verify

    try:
        if args.to_llama:
            dst = to_llama(
                args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size, force=args.force, dry_run=args.dry_run
            )
        else:
            names = (*MEMORY_OPTIONS, "dtype", "shard_size", "force", "dry_run")
            dst = convert(args.src, args.dst, **{name: getattr(args, name) for name in names})
        if not args.dry_run:
            print(f"wrote {dst}")
            check = args.verify if args.verify is not None else should_verify_by_default(args.src, args.dtype)
            if check:
                print(f"verified: max abs logit difference {verify(args.src, dst):.3g}")
    except (ConversionError, OSError) as exc:  # bad input, or a write that failed (nothing was left behind)
        print(f"error: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


__all__ = ["build_parser", "main", "parse_layers"]
