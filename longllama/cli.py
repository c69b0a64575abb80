"""What the console scripts (`longllama-convert`, `longllama-passkey`, `longllama-train`) share: the `--threads` flag
and the set-up that follows argument parsing.

This module imports nothing heavy: a script builds its parser and parses its arguments before torch and transformers
load, so `--help` and argument errors answer at once (`longllama/__init__.py` defers `register()` in these scripts).
"""

import argparse
import sys

THREADS_HELP = (
    "torch CPU threads (default: OMP_NUM_THREADS when set, else torch's default of one per core); fewer threads than "
    "cores is much faster when other processes keep the cores busy (docs/troubleshooting.md)"
)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a whole number of at least 1")
    return value


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, metavar="N", help=THREADS_HELP)


def start(threads: int | None = None) -> None:
    """Run once the arguments are parsed: register LongLLaMA with transformers (`longllama.register`); when `threads`
    is given, set torch's intra-op CPU threads (otherwise torch keeps its default, which honours OMP_NUM_THREADS); and
    when stderr is not a terminal, turn off transformers' progress bars (its weight loading's, the model's window bar
    and the scripts' own), which would fill a log file with lines of carriage returns."""
    import torch
    from transformers.utils import logging

    from . import register

    register()
    if threads is not None:
        torch.set_num_threads(threads)
    if not sys.stderr.isatty():
        logging.disable_progress_bar()


__all__ = ["THREADS_HELP", "add_threads_flag", "positive_int", "start"]
