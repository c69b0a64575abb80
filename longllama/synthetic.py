"""Synthetic retrieval data for training and testing small LongLLaMA models from scratch (no downloads).

`FactsTask` writes documents of key-value facts followed by questions about them. Every word is one token of the
word-level tokenizer `word_tokenizer()` builds, so a document is exactly `windows * window` tokens with its
`<s>`/`</s>` and its windows line up with the rows of a k-packed batch (`longllama.data`, pack_size = windows):
the facts of the first windows are only reachable from the last window through memory.

    k0 k7 k3 v12 ; k5 k1 k9 v3 ; ...            facts (earlier windows; the last window has a few more)
    ? k5 k1 k9 v3 ; ? ...                       questions (last window): the answer follows the key

The value directly follows its key, so a 2-layer model can learn the lookup as an induction head (a previous-token
head in layer 0, content matching in layer 1).
"""

import random
from dataclasses import dataclass

QUESTION, END = "?", ";"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def word_tokenizer(words: list[str]):
    """A `PreTrainedTokenizerFast` with one id per word (split on whitespace), `<s>`/`</s>`/`<pad>`/`<unk>` first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(dict.fromkeys(SPECIAL_TOKENS + list(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@dataclass
class FactsTask:
    """Documents of `windows` windows of `window` tokens: facts, then questions in the last window.

    A fact is `key_length` key symbols, a value, `;`; keys are distinct within a document. The last window states
    `local_facts` new facts, asks `local_questions` about them (which teach the lookup inside one window), and
    fills the rest with questions about facts of the earlier windows (answerable only through memory).
    """

    window: int = 64
    windows: int = 2
    key_length: int = 3
    symbols: int = 40
    values: int = 32
    local_facts: int = 2
    local_questions: int = 2

    @property
    def fact_length(self) -> int:
        return self.key_length + 2

    def vocabulary(self) -> list[str]:
        keys = [f"k{i}" for i in range(self.symbols)]
        return keys + [f"v{i}" for i in range(self.values)] + [END, QUESTION, "."]

    def tokenizer(self):
        return word_tokenizer(self.vocabulary())

    def _fact(self, rng: random.Random, exclude: set) -> list[str]:
        """A fact with a key not in `exclude` (which then holds it too: keys are distinct within a document)."""
        if len(exclude) >= self.symbols**self.key_length:
            raise ValueError(
                f"No distinct key left: {self.symbols}**{self.key_length} keys are all used or excluded; raise symbols."
            )
        while True:
            key = tuple(f"k{rng.randrange(self.symbols)}" for _ in range(self.key_length))
            if key not in exclude:
                break
        exclude.add(key)
        return [*key, f"v{rng.randrange(self.values)}", END]

    @staticmethod
    def _fill(words: list[str], length: int) -> list[str]:
        return words + ["."] * (length - len(words))

    def copy_document(self, rng: random.Random) -> dict:
        """A warm-up document: a random run of key and value symbols, `?`, then the same run again (its length varies,
        so only a content lookup, not a fixed offset, predicts the copy). It teaches the induction-style lookup that
        the facts need, fast (../shared/reference/demo_model_notes.md: a copy warm-up works where facts alone stall).
        `copy_answers` are the token positions of the copied run (0 = `<s>`)."""
        room = self.windows * self.window - 2
        length = rng.randint(4, (room - 1) // 2)
        symbols = [f"k{i}" for i in range(self.symbols)] + [f"v{i}" for i in range(self.values)]
        run = [rng.choice(symbols) for _ in range(length)]
        words = self._fill(run + [QUESTION] + run, room)
        start = 1 + length + 1
        return {"text": " ".join(words), "keys": [], "copy_answers": list(range(start + 1, start + length))}

    def document(self, rng: random.Random, exclude_keys=()) -> dict:
        """`{"text": ..., "keys": [...], "memory_answers": [...], "local_answers": [...]}`; the answers are token
        positions (0 = `<s>`) of the value words answering memory and local questions. Keys (tuples of symbols) in
        `exclude_keys` are not used: distractor documents that cannot contain the right answer by accident."""
        exclude = {tuple(key) for key in exclude_keys}
        total, f = self.windows * self.window, self.fact_length
        # earlier windows: facts (the first starts after <s>)
        words, earlier = [], []
        for w in range(self.windows - 1):
            room = self.window - (1 if w == 0 else 0)
            window_words = []
            while len(window_words) + f <= room:
                fact = self._fact(rng, exclude)
                earlier.append(fact)
                window_words += fact
            words += self._fill(window_words, room)
        # last window (ends before </s>): a few new facts, then questions about earlier and new facts
        room = self.window - (2 if self.windows == 1 else 1)  # </s>, and <s> too in a one-window document
        local = [self._fact(rng, exclude) for _ in range(self.local_facts)]
        last = [w for fact in local for w in fact]
        n_questions = (room - len(last)) // (f + 1)
        n_local = min(self.local_questions, n_questions) if local else 0
        asked = [rng.choice(local) for _ in range(n_local)]
        asked += rng.sample(earlier, min(n_questions - n_local, len(earlier)))
        rng.shuffle(asked)
        memory_answers, local_answers = [], []
        start = 1 + len(words)  # token position of the last window's first word (after <s>)
        for fact in asked:
            position = start + len(last) + 1 + self.key_length  # ? key... value
            (local_answers if any(fact is x for x in local) else memory_answers).append(position)
            last += [QUESTION] + fact
        words += self._fill(last, room)
        assert len(words) == total - 2
        keys = [fact[: self.key_length] for fact in earlier + local]
        return {"text": " ".join(words), "keys": keys, "memory_answers": memory_answers, "local_answers": local_answers}


__all__ = ["FactsTask", "word_tokenizer"]
