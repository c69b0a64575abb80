"""The passkey retrieval benchmark (docs/passkey.md#the-prompt, the FoT paper's headline result) and
`longllama-passkey`.

    longllama-passkey path/to/long_llama_3b --lengths 4k,16k,100k --trials 10 --json passkey.json --plot passkey.png

A prompt is five lines: the task, filler, the key line at a chosen depth, more filler, the question. Filler is the
filler sentence group repeated (joined by spaces) and may stop after any of its tokens. The model answers by greedy
decoding; a trial is correct when its first generated tokens are the key's tokens (the published rule).

Prompts are built from tokens, so a 256k-token prompt costs no tokenization: the filler is tokenized once as it appears
after a line break (`first`: the first sentence group, `unit`: every later one) and repeated. The text cut at every
filler token is found once per tokenizer, and a prompt's ids are those of a *short* prompt with the same cuts
(tokenized for real: its line breaks, key and question are the tokenizer's own) with whole filler units inserted.
So `input_ids == tokenizer(text).input_ids` (leading special tokens included) and the length is exactly the one asked.
"""

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .cli import add_threads_flag, start
from .files import atomic_write_text

# torch, transformers and the model code are imported inside the functions that run a model, so that the
# `longllama-passkey` command parses its arguments (and answers `--help`) before loading them.

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
FILLER = " ".join(FILLER_SENTENCES)
KEY_RANGE = (1, 50000)  # keys are integers in [1, 50000)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def key_line(key: int, name: str = "pass") -> str:
    """The line that hides the key (`name` other than "pass": the training documents' other keys)."""
    return f"The {name} key is {key}. Remember it. {key} is the {name} key."


def question_line(name: str = "pass") -> str:
    """The question at the end of the prompt; the answer follows it after a space."""
    return f"What is the {name} key? The {name} key is"


QUESTION = question_line()


def prompt_text(key: int, filler_before: str, filler_after: str) -> str:
    """The prompt as text: task, filler, key line, filler, question, joined by newlines (docs/passkey.md#the-prompt)."""
    return "\n".join([TASK, filler_before, key_line(key), filler_after, QUESTION])


# ---------------------------------------------------------------------------------------------------------------------
# Prompts of exact token lengths


class PasskeyPrompts:
    """Passkey prompts of exact token lengths for one tokenizer.

    `build(length, depth, key)` returns `(input_ids, answer_ids)`: `length` token ids, leading special tokens (BOS)
    included, equal to `tokenizer(text).input_ids` for `text(length, depth, key)`; and the key's tokens as the model
    should generate them after the question. `depth` in [0, 1] is the share of the filler tokens placed before the
    key line (within a token or two where the tokenizer cannot cut the filler at every token). Raises `ValueError` for
    a tokenizer whose tokens cannot be scored (see `answer_ids`) or whose filler is not periodic.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.specials = self._leading_specials()
        context = TASK + "\n"  # every filler segment follows a line break after a sentence
        self.base = self.encode(context)
        one, two, three = (self.encode(context + " ".join([FILLER] * n)) for n in (1, 2, 3))
        F, P = len(one) - len(self.base), len(two) - len(one)
        periodic = (
            F > 0 and P > 0 and len(three) - len(two) == P and three[: len(two)] == two and two[: len(one)] == one
            and one[: len(self.base)] == self.base and three[len(two) :] == two[len(one) :]
        )
        if not periodic:
            raise ValueError(
                "This tokenizer does not split the repeated filler into repeating tokens (it merges tokens across "
                "sentence groups or lines), so prompts cannot be built from tokens."
            )
        self.first, self.unit = one[len(self.base) :], two[len(one) :]  # `first` tokens, then `unit` forever
        self.cuts = self._filler_cuts(context, two[len(self.base) :])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _leading_specials(self) -> list[int]:
        """The ids the tokenizer puts before the text (BOS for Llama). Trailing ones (EOS) are not used: the model
        has to continue the prompt."""
        full, plain = self.tokenizer("pass")["input_ids"], self.encode("pass")
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def _filler_cuts(self, context: str, stream: list[int]) -> dict[int, int]:
        """{n: characters of `FILLER + " " + FILLER` that tokenize (after `context`) to its first n tokens}, for
        n < len(first) + len(unit). The shortest such text; a count with none cannot end a filler segment."""
        text, cuts = FILLER + " " + FILLER, {}
        for end in range(len(text) + 1):
            ids = self.encode(context + text[:end])
            n = len(ids) - len(self.base)
            if 0 <= n < len(stream) and n not in cuts and ids == self.base + stream[:n]:
                cuts[n] = end
        return cuts

    # ---- filler of n tokens

    def _offset(self, n: int) -> int:
        """Where a cut after n filler tokens falls in the tokens of `FILLER + " " + FILLER` (the same text and
        tokens follow it: the filler is periodic after `first`)."""
        F, P = len(self.first), len(self.unit)
        return n if n < F + P else F + (n - F) % P

    def can_cut(self, n: int) -> bool:
        return self._offset(n) in self.cuts

    def filler_text(self, n: int) -> str:
        """The text of the first n filler tokens (for n with `can_cut(n)`)."""
        F, P = len(self.first), len(self.unit)
        text = (FILLER + " " + FILLER)[: self.cuts[self._offset(n)]]
        if n < F + P:
            return text
        return FILLER + " " + " ".join([FILLER] * ((n - F) // P)) + text[len(FILLER) :]

    def _short(self, n: int) -> int:
        """The shortest filler with the same cut as n filler tokens: n less a whole number of units."""
        F, P = len(self.first), len(self.unit)
        return n if n < F + P else F + P + (n - F) % P

    # ---- prompts

    def answer_ids(self, key: int) -> list[int]:
        """The key's tokens as the model generates them after the question, checked to be the tokens the key has in
        the key line: otherwise a model that copies the key would be scored wrong."""
        if not (isinstance(key, int) and KEY_RANGE[0] <= key < KEY_RANGE[1]):
            raise ValueError(f"key {key!r}: pass keys are integers in [{KEY_RANGE[0]}, {KEY_RANGE[1]}).")
        question, answered = self.encode(QUESTION), self.encode(f"{QUESTION} {key}")
        answer = answered[len(question) :]
        before, in_line = self.encode(FILLER + "\nThe pass key is"), self.encode(FILLER + "\n" + key_line(key))
        copied = in_line[len(before) : len(before) + len(answer)]  # the key's tokens in the key line
        if answered[: len(question)] != question or in_line[: len(before)] != before or copied != answer:
            show = self.tokenizer.convert_ids_to_tokens
            raise ValueError(
                f"This tokenizer splits the key {key} differently in the key line "
                f"({show(in_line[len(before) : len(before) + len(answer) + 1])}) than after the question "
                f"({show(answer)}), so a model that copies the key exactly would be scored wrong. The passkey "
                "benchmark needs a tokenizer that keeps digits apart from the punctuation around them, e.g. "
                "sentencepiece with split_digits (Llama, OpenLLaMA)."
            )
        if self.tokenizer.decode(answer, skip_special_tokens=True).strip() != str(key):
            raise ValueError(
                f"This tokenizer cannot write the key {key}: its tokens {answer} decode to "
                f"{self.tokenizer.decode(answer)!r}. The passkey benchmark needs a tokenizer with digits."
            )
        return answer

    def minimum_length(self, key: int) -> int:
        """Tokens of the prompt without filler (task line, key line, question, special tokens)."""
        return len(self.specials) + len(self.encode(prompt_text(key, "", "")))

    def _ids(self, key: int, before: int, after: int) -> list[int]:
        """The prompt ids with `before` and `after` filler tokens: a short prompt with the same filler cuts,
        tokenized, with whole filler units inserted after each segment's `first` tokens."""
        short_before, short_after = self._short(before), self._short(after)
        ids = self.encode(prompt_text(key, self.filler_text(short_before), self.filler_text(short_after)))
        head = TASK + "\n" + self.filler_text(short_before) + "\n" + key_line(key) + "\n"
        # later segment first, so that the earlier one's position stays valid
        for n, short, start in ((after, short_after, len(self.encode(head))), (before, short_before, len(self.base))):
            if short == n:
                continue
            F = len(self.first)
            if ids[start : start + F + len(self.unit)] != self.first + self.unit:
                raise ValueError(
                    "This tokenizer merges the filler with the line before it, so prompts cannot be built from tokens."
                )
            ids[start + F : start + F] = self.unit * ((n - short) // len(self.unit))
        return self.specials + ids

    def layout(self, length: int, depth: float, key: int) -> tuple[int, int]:
        """(filler tokens before the key line, after it) for a prompt of exactly `length` tokens."""
        filler = length - self._fixed_length(length, depth, key)
        for _ in range(8):  # a line break may tokenize differently next to filler than next to another line
            before, after = self._split(filler, depth)
            got = len(self._ids(key, self._short(before), self._short(after))) + before + after
            got -= self._short(before) + self._short(after)
            if got == length:
                return before, after
            filler += length - got
        raise ValueError(f"Cannot build a passkey prompt of exactly {length} tokens with this tokenizer.")

    def _fixed_length(self, length: int, depth: float, key: int) -> int:
        """The tokens of a prompt that are not filler (`minimum_length`), once `length` and `depth` are checked."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth}: a depth is the share of the filler before the key line, in [0, 1].")
        minimum = self.minimum_length(key)
        if length < minimum:
            raise ValueError(
                f"A passkey prompt of {length} tokens is shorter than its fixed part (task line, key line and "
                f"question take {minimum} tokens with this tokenizer): use lengths of at least {minimum}."
            )
        return minimum

    def _split(self, filler: int, depth: float) -> tuple[int, int]:
        """`filler` tokens cut into (before, after) nearest to `depth`, at cuts the tokenizer can make."""
        target = round(depth * max(filler, 0))
        for distance in range(max(filler, 0) + 1):
            for before in (target - distance, target + distance):
                if 0 <= before <= filler and self.can_cut(before) and self.can_cut(filler - before):
                    return before, filler - before
        raise ValueError(f"Cannot cut {filler} filler tokens into two segments with this tokenizer.")

    def build(self, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
        """`(input_ids, answer_ids)` of the prompt of exactly `length` tokens with the key line at `depth`."""
        answer = self.answer_ids(key)
        before, after = self.layout(length, depth, key)
        return self._ids(key, before, after), answer

    def text(self, length: int, depth: float, key: int) -> str:
        """The text of `build(length, depth, key)`'s prompt."""
        before, after = self.layout(length, depth, key)
        return prompt_text(key, self.filler_text(before), self.filler_text(after))


class FillerPrompts(PasskeyPrompts):
    """Passkey prompts whose filler is any text (`longllama-passkey --filler FILE`): the benchmark's task line, key
    line and question around the first tokens of `text`, consumed in order (the filler after the key line continues
    where the filler before it stopped), and `text` repeated (joined by a space) when it has fewer tokens than the
    prompt needs.

    The filler is tokenized once, as it follows a line break; the task line, the key line and the question are
    tokenized in their context (after a sentence), and the parts are joined as token ids. The filler can stop after
    any of its tokens, so `length` is exact, but re-tokenizing the decoded text may differ by a token at each cut.
    Only the first `max_chars` characters of `text` are read (enough for any prompt the caller will build).
    """

    def __init__(self, tokenizer, text: str, max_chars: int | None = None):
        self.tokenizer = tokenizer
        self.specials = self._leading_specials()
        text = text.strip()
        if not text:
            raise ValueError("The filler text is empty: give a file with text to hide the pass key in.")
        text = text[:max_chars] if max_chars else text
        line_break = self.encode(TASK + "\n")
        one = self.encode(TASK + "\n" + text)
        if one[: len(line_break)] != line_break:
            raise ValueError("This tokenizer merges the filler with the line break before it; prompts cannot be "
                             "built from tokens.")
        self.base, self.first = line_break, one[len(line_break) :]  # the text's tokens after a line break
        two = self.encode(TASK + "\n" + text + " " + text)
        self.unit = two[len(one) :] if two[: len(one)] == one else self.first  # each repetition after the first
        self.chars = len(text)
        self.key_part = self._after_sentence("\n{line}\n")
        self.question = self._after_sentence("\n" + QUESTION)

    def _after_sentence(self, template: str, key: int | None = None) -> list[int]:
        """The tokens of `template` (with `{line}` the key line of `key`) as they follow a sentence."""
        head = self.encode("It is.")
        ids = self.encode("It is." + template.format(line=key_line(key) if key is not None else ""))
        if ids[: len(head)] != head:
            raise ValueError("This tokenizer merges a line break with the sentence before it; prompts cannot be "
                             "built from tokens.")
        return ids[len(head) :]

    def filler_ids(self, start: int, n: int) -> list[int]:
        """Tokens `start` to `start + n` of the filler stream (the text, then its repetitions)."""
        missing = start + n - len(self.first)
        if missing > 0:  # only as many repetitions as asked for
            self.first = self.first + self.unit * -(-missing // len(self.unit))
        return self.first[start : start + n]

    def minimum_length(self, key: int) -> int:
        return len(self.specials) + len(self.base) + len(self._after_sentence("\n{line}\n", key)) + len(self.question)

    def layout(self, length: int, depth: float, key: int) -> tuple[int, int]:
        filler = length - self._fixed_length(length, depth, key)
        before = round(depth * filler)
        return before, filler - before

    def build(self, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
        answer = self.answer_ids(key)
        before, after = self.layout(length, depth, key)
        ids = [*self.specials, *self.base, *self.filler_ids(0, before), *self._after_sentence("\n{line}\n", key),
               *self.filler_ids(before, after), *self.question]
        return ids, answer

    def text(self, length: int, depth: float, key: int) -> str:
        return self.tokenizer.decode(self.build(length, depth, key)[0], skip_special_tokens=True)


def read_filler(path: str | Path) -> str:
    """The text of a `--filler` file; `ValueError` in one line for a missing, unreadable, empty or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--filler {path}: no such file.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--filler {path}: not UTF-8 text (invalid byte at offset {error.start}).") from None
    except OSError as error:
        raise ValueError(f"--filler {path}: cannot be read ({error.strerror}).") from None
    if not text.strip():
        raise ValueError(f"--filler {path}: the file is empty; give a text to hide the pass key in.")
    return text


def make_prompts(tokenizer, filler: str | None = None, max_length: int = 0) -> PasskeyPrompts:
    """The standard prompts, or with `filler` those of `FillerPrompts` (reading at most 20 characters per token of
    the longest prompt)."""
    return PasskeyPrompts(tokenizer) if filler is None else FillerPrompts(tokenizer, filler, 20 * max_length or None)


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
    """`(input_ids, answer_ids)`: a passkey prompt of exactly `length` tokens (see `PasskeyPrompts`)."""
    return PasskeyPrompts(tokenizer).build(length, depth, key)


# ---------------------------------------------------------------------------------------------------------------------
# Running the benchmark


@dataclass(frozen=True)
class Trial:
    length: int
    depth: float
    key: int


def plan_trials(lengths, depths, trials: int, seed: int = 0) -> list[Trial]:
    """`trials` per length, spread evenly over `depths` (in a seeded random order, which decides the depths that get
    one more when `trials` is not a multiple), each with a seeded random key. Same seed, same plan."""
    if trials < 1:
        raise ValueError(f"trials={trials}: run at least one trial per length.")
    if not lengths or not depths:
        raise ValueError("Give at least one length and one depth.")
    rng = random.Random(seed)
    plan = []
    for length in lengths:
        order = list(depths)
        rng.shuffle(order)
        plan += [Trial(length, order[i % len(order)], rng.randrange(*KEY_RANGE)) for i in range(trials)]
    return plan


def check_trials(prompts: PasskeyPrompts, plan: list[Trial]) -> None:
    """Every error a trial would raise, before any compute (lengths below the fixed part, keys the tokenizer splits)."""
    minimum = max(prompts.minimum_length(trial.key) for trial in plan)
    short = sorted({trial.length for trial in plan if trial.length < minimum})
    if short:
        raise ValueError(
            f"Lengths {short} are shorter than the prompt's fixed part (task line, key line and question take up to "
            f"{minimum} tokens with this tokenizer): use lengths of at least {minimum}."
        )
    for trial in plan:
        prompts.answer_ids(trial.key)
        prompts.layout(trial.length, trial.depth, trial.key)


def is_correct(generated_ids: list[int], answer_ids: list[int]) -> bool:
    """The published rule: the first generated tokens are the key's tokens."""
    return list(generated_ids[: len(answer_ids)]) == list(answer_ids)


def run_trial(model, tokenizer, prompts: PasskeyPrompts, trial: Trial, extra_new_tokens: int = 4,
              last_context_length: int | None = None) -> dict:
    """One greedy generation; returns the result record (see `run_passkey`)."""
    input_ids, answer = prompts.build(trial.length, trial.depth, trial.key)
    return {"length": trial.length, "depth": trial.depth, "key": trial.key,
            **answer_prompt(model, tokenizer, input_ids, answer, extra_new_tokens, last_context_length)}


def answer_prompt(model, tokenizer, input_ids: list[int], answer: list[int], extra_new_tokens: int = 4,
                  last_context_length: int | None = None) -> dict:
    """Greedy `generate()` on one prompt, scored against the key's tokens `answer`: `predicted`, `correct`,
    `seconds`, `tokens_per_s`, `answer_ids`, `generated_ids` (see `run_passkey`)."""
    import torch

    ids = torch.tensor([input_ids], device=getattr(model, "device", "cpu"))
    kwargs = {} if last_context_length is None else {"last_context_length": last_context_length}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=len(answer) + extra_new_tokens, **kwargs)
    seconds = max(time.perf_counter() - start, 1e-9)
    generated = out[0, len(input_ids) :].tolist()
    return {
        "predicted": tokenizer.decode(generated, skip_special_tokens=True), "correct": is_correct(generated, answer),
        "seconds": seconds, "tokens_per_s": len(input_ids) / seconds,
        "answer_ids": answer, "generated_ids": generated,
    }


def run_passkey(model, tokenizer, lengths, depths=DEFAULT_DEPTHS, trials: int = 5, seed: int = 0, *,
                last_context_length: int | None = None, extra_new_tokens: int = 4, on_result=None,
                progress: bool = True, filler: str | None = None) -> list[dict]:
    """Run the passkey benchmark: `trials` prompts per length in `lengths` (tokens), spread over `depths`.

    Greedy `model.generate(..., max_new_tokens=len(answer) + extra_new_tokens)`; `last_context_length` is passed to
    `generate` when given (LongLLaMA's final-window override). Every prompt is checked before the first generation.
    Returns one dict per trial: `length`, `depth`, `key`, `predicted` (decoded generated text), `correct`, `seconds`
    (the generate call), `tokens_per_s` (prompt tokens / seconds), `answer_ids`, `generated_ids`. `on_result(result)`
    is called after each trial, so a caller keeps the finished ones when a KeyboardInterrupt stops the run.
    `filler`: a text to use as the filler instead of the standard one (`FillerPrompts`).
    """
    from transformers.utils import logging  # its bars honour transformers' `disable_progress_bar()`

    prompts = make_prompts(tokenizer, filler, max(lengths))
    plan = plan_trials(lengths, depths, trials, seed)
    check_trials(prompts, plan)
    if hasattr(model, "eval"):
        model.eval()
    results = []
    # a bar on a terminal only (`disable=None`: none when stderr is a file or pipe); the model shows its own bar over
    # the windows of a long prompt
    with logging.tqdm(plan, desc="passkey", unit="trial", disable=None if progress else True) as bar:
        for trial in bar:
            result = run_trial(model, tokenizer, prompts, trial, extra_new_tokens, last_context_length)
            results.append(result)
            bar.set_postfix(accuracy=f"{sum(r['correct'] for r in results) / len(results):.0%}")
            if on_result is not None:
                on_result(result)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def _grid(results: list[dict]):
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    cells = {}
    for r in results:
        cells.setdefault((r["length"], r["depth"]), []).append(r["correct"])
    return lengths, depths, cells


def accuracy_table(results: list[dict]) -> str:
    """Correct / trials by length (rows) and depth (columns), accuracy and mean tokens/s per length."""
    lengths, depths, cells = _grid(results)
    headers = ["length"] + [f"depth {d:g}" for d in depths] + ["accuracy", "tokens/s"]
    rows = []
    for length in lengths:
        done = [r for r in results if r["length"] == length]
        counts = [cells.get((length, d)) for d in depths]
        rows.append(
            [str(length)] + [f"{sum(c)}/{len(c)}" if c else "-" for c in counts]
            + [f"{sum(r['correct'] for r in done) / len(done):.0%}",
               f"{sum(r['tokens_per_s'] for r in done) / len(done):.0f}"]
        )
    widths = [max(len(row[i]) for row in [headers] + rows) for i in range(len(headers))]
    line = lambda row: " | ".join(c.rjust(w) for c, w in zip(row, widths))  # noqa: E731
    total = f"{sum(r['correct'] for r in results)}/{len(results)} correct"
    return "\n".join([line(headers), "-+-".join("-" * w for w in widths), *map(line, rows), total])


def plot_accuracy(results: list[dict], path: str | Path) -> None:
    """A PNG heatmap of accuracy: depth (rows) by length (columns), cells annotated with correct/trials."""
    from matplotlib.figure import Figure

    lengths, depths, cells = _grid(results)
    accuracy = [[float("nan")] * len(lengths) for _ in depths]
    figure = Figure(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    ax = figure.subplots()
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            c = cells.get((length, depth))
            if c:
                accuracy[i][j] = sum(c) / len(c)
                ax.text(j, i, f"{sum(c)}/{len(c)}", ha="center", va="center", fontsize=8)
    image = ax.imshow(accuracy, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"Passkey retrieval: {sum(r['correct'] for r in results)}/{len(results)} correct")
    figure.colorbar(image, ax=ax, label="accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_json_atomically(path: str | Path, payload: dict) -> None:
    """Write `payload` to `path` whole or not at all (`files.atomic_write_text`), one line per trial."""
    lines = []
    for name, value in payload.items():  # one line per field, and per trial in lists of trials
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f" {json.dumps(name)}: [\n  " + ",\n  ".join(map(json.dumps, value)) + "\n ]")
        else:
            lines.append(f" {json.dumps(name)}: {json.dumps(value)}")
    atomic_write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parse_lengths(text: str) -> list[int]:
    """'4k,16k,100000' -> [4000, 16000, 100000]: k is 1000 (so 100k is 100,000 tokens, not 102,400)."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = float(part[:-1]) * 1000 if part.endswith("k") else int(part)
        except ValueError:
            value = None
        if value is None or value != int(value) or value < 1:
            raise argparse.ArgumentTypeError(
                f"invalid length {part!r}: give token counts separated by commas, as integers or with k = 1000 "
                "(e.g. 4k,16k,100000)."
            )
        lengths.append(int(value))
    return list(dict.fromkeys(lengths))


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]: fractions of the filler placed before the key line."""
    depths = []
    for part in text.split(","):
        try:
            depth = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid depth {part.strip()!r}: give fractions separated by commas (e.g. 0,0.25,0.5,0.75,1)."
            ) from None
        if not 0.0 <= depth <= 1.0:
            raise argparse.ArgumentTypeError(
                f"depth {depth:g} is outside [0, 1]: a depth is the share of the filler before the key line "
                "(0: right after the task line, 1: right before the question)."
            )
        depths.append(depth)
    return list(dict.fromkeys(depths))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longllama-passkey",
        description="The passkey retrieval benchmark of the FoT paper: hide a random 'pass key' in a long filler "
        "text at a chosen depth and ask for it at the end; greedy decoding, a trial is correct when the model "
        "generates the key's tokens. Prints accuracy by prompt length and depth.",
        epilog="examples:\n"
        "  longllama-passkey ./long_llama_3b --lengths 4k,16k --trials 5        # a quick check\n"
        "  longllama-passkey ./long_llama_3b --lengths 100k,256k --trials 20 --json pk.json --plot pk.png\n"
        "  longllama-passkey --demo\n"
        "  longllama-passkey --demo --lengths 100k --filler my_document.txt    # your own haystack\n"
        "Ctrl-C stops the run: the finished trials are printed and kept in --json (written after every trial). "
        "See docs/passkey.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="checkpoint directory (with config.json), e.g. from longllama-convert")
    parser.add_argument("--demo", action="store_true", help="use the bundled demo model instead of MODEL")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,16k,64k,100k,256k"),
                        help="prompt lengths in tokens, comma-separated; k = 1000 (default: 4k,16k,64k,100k,256k)")
    parser.add_argument("--depths", type=parse_depths, default=list(DEFAULT_DEPTHS),
                        help="depths of the key line in [0, 1]: share of the filler before it (default: 0,0.25,0.5,"
                        "0.75,1)")
    parser.add_argument("--trials", type=int, default=5, help="trials per length, spread over the depths (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys and depths (default: 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                        help="model dtype; auto: the checkpoint's (default: float32)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_threads_flag(parser)
    parser.add_argument("--filler", metavar="FILE", help="a UTF-8 text file to hide the key in instead of the "
                        "standard filler: read in order (the filler after the key continues the text), repeated when "
                        "shorter than a prompt")
    parser.add_argument("--last-context-length", type=int,
                        help="tokens of the final local window (default: the model config's last_context_length)")
    parser.add_argument("--json", metavar="PATH", help="write every trial's result here (after each trial)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG heatmap of accuracy by length and depth "
                        "(needs matplotlib)")
    return parser


def resolve_model(args) -> Path:
    """The checkpoint directory: MODEL, or the demo model with --demo."""
    if args.demo == (args.model is not None):
        raise ValueError("Pass a checkpoint directory as MODEL, or --demo for the bundled demo model (not both).")
    if args.demo:
        from .demo import demo_checkpoint

        try:
            path = Path(demo_checkpoint())
        except FileNotFoundError as error:
            raise ValueError(f"--demo: {error}") from None
    else:
        path = Path(args.model)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a model checkpoint: expected a directory with config.json (and the weights), e.g. one "
            "written by longllama-convert or save_pretrained."
        )
    return path


def check_args(args) -> None:
    if args.trials < 1:
        raise ValueError(f"--trials {args.trials}: run at least one trial per length.")
    if args.last_context_length is not None and args.last_context_length < 1:
        raise ValueError(f"--last-context-length {args.last_context_length} must be a positive number of tokens.")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install matplotlib (or longllama[bench]).") from None


def prepare(args) -> tuple[Path, object, str | None]:
    """Every check, before the model loads: (checkpoint directory, tokenizer, the checkpoint's model_type). The
    checks that need no tokenizer come before torch and transformers load."""
    check_args(args)
    args.filler_text = read_filler(args.filler) if args.filler else None
    model_path = resolve_model(args)
    model_type = json.loads((model_path / "config.json").read_text()).get("model_type")
    if args.last_context_length is not None and model_type != "longllama":
        raise ValueError(f"--last-context-length is a LongLLaMA option; {model_path} holds a {model_type} model.")
    start(args.threads)
    from .data import load_tokenizer

    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else model_path)
    check_trials(make_prompts(tokenizer, args.filler_text, max(args.lengths)),
                 plan_trials(args.lengths, args.depths, args.trials, args.seed))
    return model_path, tokenizer, model_type


def load_model(path: Path, args):
    """The checkpoint as `AutoModelForCausalLM` (`longllama.register()` registered the LongLLaMA classes), so a plain
    Llama checkpoint runs as a baseline."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results: list[dict] = []
    settings = {k: getattr(args, k) for k in ("lengths", "depths", "trials", "seed", "dtype", "last_context_length",
                                              "filler")}

    def save(complete: bool) -> None:
        if args.json:
            write_json_atomically(args.json, {"model": str(model_path), "settings": settings, "complete": complete,
                                              "results": results})

    def report() -> None:
        if results:
            print(accuracy_table(results))
            if args.plot:
                plot_accuracy(results, args.plot)

    try:
        model_path, tokenizer, settings["model_type"] = prepare(args)
        model = load_model(model_path, args)
        save(complete=False)
        if args.filler_text is not None:
            settings["filler_sha256"] = hashlib.sha256(args.filler_text.encode()).hexdigest()
        run_passkey(model, tokenizer, args.lengths, args.depths, args.trials, args.seed,
                    last_context_length=args.last_context_length, filler=args.filler_text,
                    on_result=lambda result: (results.append(result), save(complete=False)))
    except (ValueError, OSError) as error:  # OSError: from_pretrained's missing or unreadable files
        print(f"longllama-passkey: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nInterrupted after {len(results)} finished trial(s).", file=sys.stderr)
        report()
        if args.json and Path(args.json).is_file():
            print(f"The finished trials are in {args.json}.", file=sys.stderr)
        return 130
    save(complete=True)
    report()
    return 0


__all__ = [
    "DEFAULT_DEPTHS", "FILLER", "QUESTION", "TASK", "FillerPrompts", "PasskeyPrompts", "Trial", "accuracy_table",
    "answer_prompt", "is_correct", "key_line", "main", "make_prompts", "passkey_prompt", "question_line", "plan_trials",
    "plot_accuracy", "prompt_text", "read_filler", "run_passkey",
]


if __name__ == "__main__":
    sys.exit(main())
