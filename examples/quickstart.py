"""Quickstart on a tiny random LongLLaMA: long-prompt generation, a session continued across calls, and a
drop-in checkpoint that loads with `trust_remote_code=True`.

    python examples/quickstart.py [--tokens 20000] [--save-dir DIR]

On this project's 2-core machine, idle (load average 0.7), `python examples/quickstart.py` took 5.7 s in all and its
20k-token generate() 1.4 s (measured with `time`); on a busy machine it can take many times longer
(docs/troubleshooting.md).
"""

import argparse
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000, help="prompt length in tokens (default 20000)")
    parser.add_argument("--save-dir", help="where to save the checkpoint (default: a temporary directory)")
    args = parser.parse_args()  # before torch and transformers load: --help answers at once

    import torch
    from transformers import AutoModelForCausalLM

    from longllama import LongLlamaCache, LongLlamaConfig, LongLlamaForCausalLM

    torch.set_grad_enabled(False)
    # A small random model: 4 layers, memory in layers 1 and 2, windows of 512 tokens.
    torch.manual_seed(0)
    config = LongLlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=512, last_context_length=256, mem_layers=[1, 2],
    )
    model = LongLlamaForCausalLM(config).eval()

    # 1. generate() over a long prompt: processed window by window, memory kept in a LongLlamaCache
    prompt = torch.randint(3, 1000, (1, args.tokens))
    cache = LongLlamaCache(config)
    start = time.time()
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, cache=cache)
    print(f"{args.tokens} prompt tokens + 10 new in {time.time() - start:.1f} s: {out[0, -10:].tolist()}")
    print(f"memory holds {cache.memory_length()} tokens per memory layer, {cache.nbytes / 2**20:.1f} MiB in all")

    # 2. the same session continues: pass the cache again with the whole history plus the new tokens
    follow_up = torch.randint(3, 1000, (1, 50))
    out = model.generate(torch.cat([out, follow_up], dim=1), max_new_tokens=5, do_sample=False, cache=cache)
    print(f"continued the session: {out[0, -5:].tolist()} (session has seen {cache.get_seq_length()} tokens)")

    # 3. a drop-in checkpoint: safetensors + the code files, loadable without this package
    save_dir = args.save_dir or tempfile.mkdtemp(prefix="longllama-")
    model.save_pretrained(save_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir, trust_remote_code=True)
    same = torch.equal(reloaded(prompt[:, :300]).logits, model(prompt[:, :300]).logits)
    print(f"saved to {save_dir}; reloaded logits identical: {same}")


if __name__ == "__main__":
    main()
