"""Read a long document once, save its memory, then answer several questions from the saved session.

The document is read window by window into a `LongLlamaCache` and saved with `cache.save(dir)`. Every question then
loads the session (`LongLlamaCache.load(dir, model)`, a fraction of a second) and continues it with only the question's
tokens: the document is never read again. Uses the bundled demo model, so it runs on a laptop CPU:

    python examples/document_session.py                        # a 20k-token document with three keys
    python examples/document_session.py --tokens 100000 --top-k 128 --session-dir my_session

The document hides three keys with different names ("The door key is 4127. ...") in filler text; each question is
"What is the <name> key? The <name> key is", answered greedily. `--check` also reads document and question in one
call, as a model without saved sessions would, and shows that the answer is the same.

The small demo model did not learn to tell key names apart: it answers every question with the key it read last (so
one of three answers is right). A converted 3B/7B checkpoint (`--model DIR`, on a GPU) does not have this limitation;
what the example shows is that a saved session answers exactly as re-reading the document would.

`--held-out NAME` reads a real document instead: the first `--tokens` tokens of a held-out document of the real-text
corpus (`longllama.corpus`, e.g. `email:code`, a package the demo model never saw in training). The questions are
lines of it that set a name to a constant far back (`    MAXLINELEN = 998`, each name set once, at least half the
document before its end): the question is the line up to `=`, after the whole document, and the answer is right
when the model continues it with the constant. The same questions after only the document's last window (no
memory) show what memory adds. It needs a model whose tokenizer keeps line breaks and indentation, such as the
bundled demo (version 2; version 1, `examples/demo_v1`, does not). The demo gets none right (docs/demo_model.md):

    python examples/document_session.py --held-out xml:code --tokens 60000 --questions 12
"""

import argparse
import random
import re
import tempfile
import time
from pathlib import Path

# torch, transformers and the package load in the functions that use them, after the arguments are parsed: `--help`
# and argument errors answer at once (`import longllama` registers with transformers, which takes seconds)
NAMES = ("door", "river", "silver")


def build_document(tokenizer, tokens: int, keys: dict[str, int]) -> str:
    """Task line, then filler with one key line at each of the depths 0.2, 0.5 and 0.8, about `tokens` tokens long."""
    from longllama.passkey import FILLER, TASK, key_line

    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    repeats = max(1, tokens // per_filler)
    cuts = [0, int(repeats * 0.2), int(repeats * 0.5), int(repeats * 0.8), repeats]
    parts = [TASK]
    for i, (name, key) in enumerate(keys.items()):
        parts += [" ".join([FILLER] * (cuts[i + 1] - cuts[i])), key_line(key, name)]
    parts.append(" ".join([FILLER] * (cuts[-1] - cuts[-2])))
    return "\n".join(parts)


# a constant assignment on one line: `NAME = 123`, `NAME = 'text'` (a trailing comment allowed)
ASSIGNMENT = re.compile(r"""^([ \t]*[A-Za-z_][A-Za-z0-9_]*[ \t]*=)[ \t]*(\d[\d_.]*|'[^'\n]{3,40}'|"[^"\n]{3,40}")[ \t]*(#.*)?$""",
                        re.M)


def held_out_document(tokenizer, name: str, tokens: int) -> str:
    """The first `tokens` tokens (about) of the held-out document `name`, cut at a line end."""
    from longllama.corpus import build_documents, split_documents

    documents = {d.name: d for d in split_documents(build_documents()[0])[1]}
    if name not in documents:
        raise SystemExit(f"--held-out {name}: no such held-out document; choose from {sorted(documents)}")
    text = documents[name].text
    ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    cut = tokenizer.decode(ids)
    if "\n" not in cut:
        raise SystemExit(f"--held-out {name}: this model's tokenizer does not keep line breaks, so the document "
                         "has no lines to ask about; pass --model with a real-text model (e.g. the bundled demo)")
    return cut[: cut.rfind("\n") + 1]


def constant_questions(text: str, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to `count` (question, answer) pairs: lines `NAME = constant` in the first half of `text` whose name is set
    nowhere else in it (so only this line answers the question) and whose constant is not a one-digit number."""
    found = []
    for match in ASSIGNMENT.finditer(text[: len(text) // 2]):
        question, answer = match.group(1), match.group(2)
        name = question.strip().rstrip("=").strip()
        sets = len(re.findall(rf"^[ \t]*{re.escape(name)}[ \t]*=[^=]", text, re.M))
        if sets == 1 and (not answer[0].isdigit() or len(answer) >= 2):
            found.append((question, answer))
    return rng.sample(found, min(count, len(found)))


def ask_held_out(model, tokenizer, args, generation) -> None:
    """Read a held-out document once, then ask each question from the saved session and from the last window only."""
    import torch

    from longllama import LongLlamaCache

    text = held_out_document(tokenizer, args.held_out, args.tokens)
    questions = constant_questions(text, args.questions, random.Random(args.seed))
    if not questions:
        raise SystemExit(f"--held-out {args.held_out}: no line of the form NAME = constant in its first half.")
    document = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        cache = model(document, use_cache=True, logits_to_keep=1, mem_top_k=args.top_k).cache
    session_dir = Path(args.session_dir or tempfile.mkdtemp(prefix="longllama-session-")) / "session"
    cache.save(session_dir)
    print(f"read {document.shape[1]} tokens of {args.held_out} in {time.perf_counter() - start:.1f} s; "
          f"{len(questions)} questions")
    window = model.config.max_position_embeddings
    right = {"with memory": 0, "last window only": 0}
    for question_text, answer in questions:
        question = tokenizer("\n" + question_text, add_special_tokens=False, return_tensors="pt").input_ids
        question = question.to(model.device)
        session = LongLlamaCache.load(session_dir, model)
        mask = torch.ones(1, session.get_seq_length() + question.shape[1], dtype=torch.long, device=model.device)
        with torch.no_grad():
            out = model.generate(question, attention_mask=mask, cache=session, **generation)[0, question.shape[1] :]
            short = torch.cat([document[:, -window:], question], dim=1)
            alone = model.generate(short, attention_mask=torch.ones_like(short), **generation)[0, short.shape[1] :]
        answers = {"with memory": out, "last window only": alone}
        verdicts = []
        for arm, ids in answers.items():
            said = tokenizer.decode(ids, skip_special_tokens=True).strip()
            ok = said.startswith(answer)
            right[arm] += ok
            verdicts.append(f"{arm}: {said[:len(answer) + 6]!r} ({'right' if ok else 'wrong'})")
        position = text.index(question_text + text[text.index(question_text) + len(question_text):].split("\n")[0])
        back = len(tokenizer(text[position:], add_special_tokens=False).input_ids)
        print(f"{question_text.strip()} {answer}  [{back:,} tokens back]  " + "; ".join(verdicts))
    print(" / ".join(f"{arm}: {n}/{len(questions)} right" for arm, n in right.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000, help="document length in tokens (default 20000)")
    parser.add_argument("--top-k", type=int,
                        help="kNN retrieval: memory keys per query (default: the model's mem_top_k; 64 for the demo)")
    parser.add_argument("--session-dir", help="where to save the session (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    parser.add_argument("--model", help="a LongLLaMA checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--check", action="store_true", help="also answer from document + question in one call")
    parser.add_argument("--held-out", metavar="NAME", help="read this held-out real document instead (e.g. "
                        "email:code) and ask for constants set far back in it")
    parser.add_argument("--questions", type=int, default=10, help="questions with --held-out (default 10)")
    args = parser.parse_args()
    if args.tokens < 1000:
        parser.error("--tokens must be at least 1000: the document is filler with three key lines")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longllama import LongLlamaCache, demo_checkpoint
    from longllama.passkey import question_line

    path = args.model or demo_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto" if torch.cuda.is_available() else None).eval()
    generation = dict(max_new_tokens=8, do_sample=False, mem_top_k=args.top_k, pad_token_id=tokenizer.pad_token_id)
    rng = random.Random(args.seed)
    keys = {name: rng.randrange(1, 50000) for name in NAMES}
    if args.held_out:
        generation["max_new_tokens"] = 16
        return ask_held_out(model, tokenizer, args, generation)

    # 1. read the document once and save the session
    text = build_document(tokenizer, args.tokens, keys)
    document = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        cache = model(document, use_cache=True, logits_to_keep=1, mem_top_k=args.top_k).cache
    read = time.perf_counter() - start
    session_dir = Path(args.session_dir or tempfile.mkdtemp(prefix="longllama-session-")) / "session"
    cache.save(session_dir)
    size = sum(f.stat().st_size for f in session_dir.iterdir()) / 2**20
    print(f"read {document.shape[1]} tokens in {read:.1f} s; session saved to {session_dir} ({size:.1f} MiB)")

    # 2. answer each question from the saved session, without the document
    for name, key in keys.items():
        start = time.perf_counter()
        session = LongLlamaCache.load(session_dir, model)
        question = tokenizer("\n" + question_line(name), add_special_tokens=False, return_tensors="pt").input_ids
        question = question.to(model.device)
        # the attention mask covers the whole session (document + question): generate() then feeds only the question
        mask = torch.ones(1, session.get_seq_length() + question.shape[1], dtype=torch.long, device=model.device)
        with torch.no_grad():
            out = model.generate(question, attention_mask=mask, cache=session, **generation)
        answer = out[0, question.shape[1] :]
        text_answer = tokenizer.decode(answer, skip_special_tokens=True).strip()
        verdict = "right" if text_answer.startswith(str(key)) else "wrong"
        line = f"The {name} key is {text_answer!r} ({verdict}: {key}); {time.perf_counter() - start:.2f} s"
        if args.check:
            whole = torch.cat([document, question], dim=1)
            with torch.no_grad():
                again = model.generate(whole, attention_mask=torch.ones_like(whole), **generation)[0, whole.shape[1] :]
            line += f"; reading everything again gives the same answer: {torch.equal(again, answer)}"
        print(line)


if __name__ == "__main__":
    main()
