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
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longllama import LongLlamaCache, demo_checkpoint
from longllama.passkey import FILLER, TASK, key_line, question_line

NAMES = ("door", "river", "silver")


def build_document(tokenizer, tokens: int, keys: dict[str, int]) -> str:
    """Task line, then filler with one key line at each of the depths 0.2, 0.5 and 0.8, about `tokens` tokens long."""
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    repeats = max(1, tokens // per_filler)
    cuts = [0, int(repeats * 0.2), int(repeats * 0.5), int(repeats * 0.8), repeats]
    parts = [TASK]
    for i, (name, key) in enumerate(keys.items()):
        parts += [" ".join([FILLER] * (cuts[i + 1] - cuts[i])), key_line(key, name)]
    parts.append(" ".join([FILLER] * (cuts[-1] - cuts[-2])))
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000, help="document length in tokens (default 20000)")
    parser.add_argument("--top-k", type=int,
                        help="kNN retrieval: memory keys per query (default: the model's mem_top_k; 64 for the demo)")
    parser.add_argument("--session-dir", help="where to save the session (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    parser.add_argument("--model", help="a LongLLaMA checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--check", action="store_true", help="also answer from document + question in one call")
    args = parser.parse_args()
    if args.tokens < 1000:
        parser.error("--tokens must be at least 1000: the document is filler with three key lines")

    path = args.model or demo_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto" if torch.cuda.is_available() else None).eval()
    generation = dict(max_new_tokens=8, do_sample=False, mem_top_k=args.top_k, pad_token_id=tokenizer.pad_token_id)
    rng = random.Random(args.seed)
    keys = {name: rng.randrange(1, 50000) for name in NAMES}

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
