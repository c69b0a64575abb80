"""examples/train_demo_model.py, the `text2` mix: every example fits one pack and every passkey example can be answered
from its own key lines."""

import importlib.util
import random
import re
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "train_demo_model", Path(__file__).resolve().parents[1] / "examples" / "train_demo_model.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)

TEXTS = [
    "\n".join(f"def f{i}(x):\n    return x + {i}  # line {i} of module {m}" for i in range(400)) for m in range(3)
]


def count_tokens(text: str) -> int:
    """A stand-in tokenizer: one token per three characters, as the real one averages on code."""
    return len(text) // 3


def test_insert_keys_puts_each_key_line_on_its_own_line_and_asks_one():
    rng = random.Random(0)
    haystack = "alpha beta gamma\ndelta epsilon zeta eta theta"
    for _ in range(50):
        keys = {"pass": rng.randrange(1, 50000), "red": rng.randrange(1, 50000)}
        lines = recipe.insert_keys(rng, haystack, keys).split("\n")
        assert lines[0].startswith("There is an important info hidden")
        for name, key in keys.items():
            assert f"The {name} key is {key}. Remember it. {key} is the {name} key." in lines
        asked = re.fullmatch(r"What is the (\w+) key\? The \1 key is (\d+)\.", lines[-1])
        assert asked and int(asked.group(2)) == keys[asked.group(1)]
        # the haystack is kept whole, in order, around the key lines
        rest = " ".join(line for line in lines[1:-1] if " key is " not in line)
        assert rest.split() == haystack.split()


@pytest.mark.parametrize("kind", list(recipe.TEXT2_KINDS))
def test_text2_examples_fit_one_pack_and_answer_their_question(kind):
    rng = random.Random(1)
    for _ in range(30):
        text = recipe.text2_example(rng, kind, TEXTS, count_tokens)
        assert 0 < count_tokens(text) <= recipe.EXAMPLE_TOKENS
        question = re.search(r"What is the (\w+) key\? The \1 key is (\d+)\.$", text)
        if kind in ("real", "repeat", "synthetic"):
            name, key = question.groups()
            assert f"The {name} key is {key}. Remember it." in text[: question.start()]
        else:
            assert question is None
