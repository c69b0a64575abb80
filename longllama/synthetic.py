"""Synthetic retrieval data for training and testing small LongLLaMA models from scratch (no downloads).

`FactsTask` writes documents of key-value facts and, later, questions about them, at random positions. Every word is
one token of the word-level tokenizer `word_tokenizer()` builds, so a document is exactly `windows * window` tokens
with its `<s>`/`</s>` and its windows line up with the rows of a k-packed batch (`longllama.data`, pack_size =
windows): a question about a fact of an earlier window is only answerable through memory.

    . k0 v12 ; . . k5 v3 ; k9 v7 ; . ? k0 v12 ; ...     facts, filler, a question (`?` optional): the key again,
                                                         then the value to recall
    k3 v1 k9 k9 v4 . . ? k3 v1 k9 k9 v4 . .             a copy document: a random run, later repeated

The value directly follows its key, so a 2-layer model can learn the lookup as an induction head (a previous-token
head in layer 0, content matching in layer 1). `PasskeyTask` writes passkey-style text documents
(docs/passkey.md#the-prompt).
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
    """Documents of `windows` windows of `window` tokens: facts and questions about them, interleaved at random.

    A fact is `key_length` key symbols, a value, `;`; a question is `?` and a fact stated earlier in the document
    (each fact is asked at most once and not right after it is stated; keys are distinct within a document). Items sit at random positions, with
    0 to `max_gap` filler words (`.`) before each, and never straddle a window boundary, so the lookup cannot be
    solved by position: it needs the value's previous token (the key) in its layer-0 representation, which is what
    memory keys carry across windows. In the first window a share `first_question_rate` of the items are questions,
    in later windows `question_rate`; a question in a later window asks about a fact of an earlier window (a
    *memory* question, answerable only through memory) with probability `memory_share` when there is one left,
    else about a fact of its own window (a *local* question).
    """

    window: int = 64
    windows: int = 2
    key_length: int = 1
    symbols: int = 128
    values: int = 32
    first_question_rate: float = 0.3
    question_rate: float = 0.6
    memory_share: float = 0.8
    max_gap: int = 2
    question_marker: bool = True

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

    def _window_end(self, w: int) -> int:
        """Token position (0 = `<s>`) just past the room for words in window `w` (the last one ends before `</s>`)."""
        return (w + 1) * self.window - (1 if w == self.windows - 1 else 0)

    def document(self, rng: random.Random, exclude_keys=()) -> dict:
        """`{"text": ..., "keys": [...], "memory_answers": [...], "local_answers": [...]}`; the answers are token
        positions (0 = `<s>`) of the value words that answer memory and local questions. Keys (tuples of symbols) in
        `exclude_keys` are not used: distractor documents that cannot contain the right answer by accident."""
        if self.window < self.fact_length + self.max_gap + 2:
            raise ValueError(f"window={self.window} is too short for one fact ({self.fact_length} words) and <s>.")
        exclude = {tuple(key) for key in exclude_keys}
        words, keys = [], []
        memory_answers, local_answers = [], []
        earlier, local = [], []  # facts not asked yet: of earlier windows, of the current one
        fresh = []  # the fact just stated: askable only after another item (no fixed-offset shortcut)
        position = 1  # after <s>
        for w in range(self.windows):
            earlier += local + fresh
            local, fresh = [], []
            end = self._window_end(w)
            rate = self.first_question_rate if w == 0 else self.question_rate
            while True:
                gap = rng.randint(0, self.max_gap)
                ask = bool(earlier or local) and rng.random() < rate
                memory = ask and bool(earlier) and (not local or rng.random() < self.memory_share)
                marker = [QUESTION] if ask and self.question_marker else []
                length = self.fact_length + len(marker)
                if position + gap + length > end:
                    break
                words += ["."] * gap
                position += gap
                stale, fresh = fresh, []  # becomes askable once this item is placed
                if ask:
                    pool = earlier if memory else local
                    fact = pool.pop(rng.randrange(len(pool)))
                    (memory_answers if memory else local_answers).append(position + len(marker) + self.key_length)
                    words += [*marker, *fact]
                else:
                    fact = self._fact(rng, exclude)
                    keys.append(fact[: self.key_length])
                    fresh.append(fact)
                    words += fact
                local += stale
                position += length
            words += ["."] * (end - position)
            position = end + (1 if w == self.windows - 1 else 0)
        assert len(words) == self.windows * self.window - 2
        return {"text": " ".join(words), "keys": keys, "memory_answers": memory_answers, "local_answers": local_answers}

    def copy_document(self, rng: random.Random) -> dict:
        """A warm-up document: a random run of key and value symbols, then, later, `?` and the same run again; with
        one window both sit in it, with several the run is in an earlier window than its copy (a copy through
        memory). Lengths and positions vary, so only a content lookup (the previous-token/induction mechanism the
        facts need) predicts the copy; it is learnt much faster than the facts (docs/training.md, "Evidence:
        negatives and the distraction issue"; docs/demo_model.md). `copy_answers` are the token positions of the
        copied run after its first word (0 = `<s>`)."""
        symbols = [f"k{i}" for i in range(self.symbols)] + [f"v{i}" for i in range(self.values)]
        if self.windows == 1:
            room = self.window - 2
            length = rng.randint(4, (room - 1) // 2)
            run = [rng.choice(symbols) for _ in range(length)]
            gap = rng.randint(0, room - 2 * length - 1)
            before = rng.randint(0, gap)
            words = ["."] * before + run + ["."] * (gap - before) + [QUESTION] + run
            copy_start = 1 + len(words) - length
        else:
            source = rng.randrange(self.windows - 1)
            length = rng.randint(4, self.window // 2)
            run = [rng.choice(symbols) for _ in range(length)]
            source_start = source * self.window + rng.randint(1 if source == 0 else 0, self.window - length)
            last_start = (self.windows - 1) * self.window
            question = last_start + rng.randint(0, self._window_end(self.windows - 1) - last_start - length - 1)
            words = ["."] * (self.windows * self.window - 2)
            words[source_start - 1 : source_start - 1 + length] = run
            words[question - 1] = QUESTION
            words[question : question + length] = run
            copy_start = question + 1
        words += ["."] * (self.windows * self.window - 2 - len(words))
        return {"text": " ".join(words), "keys": [], "copy_answers": list(range(copy_start + 1, copy_start + length))}


NOUNS = ["river", "stone", "cloud", "bird", "road", "tree", "house", "moon", "field", "door", "ship", "garden",
         "window", "mountain", "lamp", "horse", "city", "book", "forest", "bridge"]
ADJECTIVES = ["red", "old", "quiet", "tall", "warm", "dark", "small", "bright", "cold", "wide", "soft", "green",
              "blue", "yellow", "slow", "long"]
KEY_NAMES = ["pass", "door", "secret", "magic", "house", "river", "blue", "silver", "hidden", "night", "first", "red"]


@dataclass
class PasskeyTask:
    """Passkey-style training documents (the benchmark's format, docs/passkey.md#the-prompt) with varied filler and key
    names, answered at the end, so that a model trained on them is not tuned to one prompt.

    A document is the task line, filler, `keys` key lines (`The {name} key is N. Remember it. N is the {name} key.`,
    distinct names, at random depths), filler, and the question about one of them followed by its answer
    (`What is the {name} key? The {name} key is N.`), lines joined by newlines. With probability `spec_share` it is the
    benchmark's exact format (one key, name `pass`, the standard filler); otherwise the filler is one of: the standard
    cycle, its sentences shuffled, or random `The {noun} is {adjective}.` sentences mixed with them; and with
    `haystacks` (real texts), also a span of real text or a few of its lines repeated. Lengths are in
    words (the tokenizer decides the tokens), uniformly in [`min_words`, `max_words`].
    """

    min_words: int = 100
    max_words: int = 1500
    max_keys: int = 3
    spec_share: float = 0.4
    names: tuple = tuple(KEY_NAMES)
    haystacks: tuple = ()  # real texts: with any, two more filler styles (`text`, `repeat`), see `_real_filler`

    def _styles(self) -> list[str]:
        # real-text styles only when there are texts, so that documents without them are the ones written before
        return ["standard", "shuffled", "varied"] + (["text", "text", "repeat"] if self.haystacks else [])

    def _real_filler(self, rng: random.Random, words: int, style: str) -> str:
        """`text`: a span of about `6 * words` characters of a random haystack, from a random line start (long
        non-repeating real text); `repeat`: one to four random lines of a haystack repeated (an unseen repeated
        filler)."""
        haystack = rng.choice(self.haystacks)
        start = haystack.find("\n", rng.randrange(len(haystack))) + 1
        if style == "text":
            return haystack[start : start + 6 * words].strip()
        lines = [line.strip() for line in haystack[start:].split("\n", 8)[:-1] if line.strip()][: rng.randint(1, 4)]
        unit = " ".join(lines) or "The grass is green."
        return " ".join([unit] * max(1, round(words / max(1, len(unit.split())))))

    def _filler(self, rng: random.Random, words: int, style: str) -> str:
        from .passkey import FILLER_SENTENCES

        if style in ("text", "repeat"):
            return self._real_filler(rng, words, style)
        sentences, count, i = [], 0, rng.randrange(len(FILLER_SENTENCES))
        while count < words:
            if style == "standard":
                sentence = FILLER_SENTENCES[i % len(FILLER_SENTENCES)]
                i += 1
            elif style == "shuffled":
                sentence = rng.choice(FILLER_SENTENCES)
            else:
                sentence = (f"The {rng.choice(NOUNS)} is {rng.choice(ADJECTIVES)}." if rng.random() < 0.6
                            else rng.choice(FILLER_SENTENCES))
            sentences.append(sentence)
            count += len(sentence.split())
        return " ".join(sentences)

    def document(self, rng: random.Random) -> dict:
        """`{"text": ..., "key": N, "name": ..., "answer_start": character offset of the answer in the text}`."""
        from .passkey import KEY_RANGE, TASK, key_line, question_line

        spec = rng.random() < self.spec_share
        names = ["pass"] if spec else rng.sample(self.names, rng.randint(1, self.max_keys))
        style = "standard" if spec else rng.choice(self._styles())
        keys = {name: rng.randrange(*KEY_RANGE) for name in names}
        filler_words = max(0, rng.randint(self.min_words, self.max_words) - 30 - 12 * len(names))
        cuts = sorted(rng.randint(0, filler_words) for _ in names)  # the key lines' depths, in filler words
        lines, previous = [TASK], 0
        for name, cut in zip(rng.sample(names, len(names)), cuts):
            if cut > previous or not lines[1:]:
                lines.append(self._filler(rng, cut - previous, style))
            lines.append(key_line(keys[name], name))
            previous = cut
        lines.append(self._filler(rng, filler_words - previous, style))
        asked = rng.choice(names)
        text = "\n".join(lines + [question_line(asked)]) + " "
        return {"text": text + f"{keys[asked]}.", "key": keys[asked], "name": asked, "answer_start": len(text)}


@dataclass
class CopyTask:
    """Copy documents in words (a retrieval task besides passkeys, and the warm-up that grows induction heads): a list
    of random numbers and words, filler, then `Repeat the list:` and the list again, so that every item after the
    first is predictable only by looking the list up. Items are numbers (1 to 5 digits) or nouns and adjectives,
    half and half. Lengths are in items and filler words, uniformly in the given ranges; the filler (the passkey
    filler sentences) may put the copy windows away from the list.
    """

    min_items: int = 4
    max_items: int = 40
    min_gap_words: int = 0
    max_gap_words: int = 200

    def _item(self, rng: random.Random) -> str:
        kind = rng.random()
        if kind < 0.5:
            return str(rng.randrange(1, 10 ** rng.randint(1, 5)))
        return rng.choice(NOUNS if kind < 0.75 else ADJECTIVES)

    def document(self, rng: random.Random) -> dict:
        """`{"text": ..., "items": [...], "copy_start": character offset of the repeated list in the text}`."""
        from .passkey import FILLER_SENTENCES

        items = [self._item(rng) for _ in range(rng.randint(self.min_items, self.max_items))]
        gap, sentences, words = rng.randint(self.min_gap_words, self.max_gap_words), [], 0
        while words < gap:
            sentences.append(rng.choice(FILLER_SENTENCES))
            words += len(sentences[-1].split())
        listed = " ".join(items)
        head = f"Here is a list: {listed}.\n" + (" ".join(sentences) + "\n" if sentences else "") + "Repeat the list: "
        return {"text": head + listed + ".", "items": items, "copy_start": len(head)}


__all__ = ["CopyTask", "FactsTask", "PasskeyTask", "word_tokenizer"]
