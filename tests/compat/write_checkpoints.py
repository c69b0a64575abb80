"""Write tiny LongLLaMA checkpoints and their reference outputs for the remote-code compatibility test.

Run with the package installed (the pinned transformers); `test_remote_code.py` then loads every checkpoint with
`trust_remote_code=True` under another transformers version, without the package, and compares.

    python tests/compat/write_checkpoints.py OUT_DIR

For each case, `OUT_DIR/<case>/` holds the `save_pretrained` directory and `reference.safetensors`:

- `ids` `[2, 30]`, `logits` `[2, 30, 99]` of one forward over 4 windows to memory plus the final window;
- `generated` `[2, 42]`: greedy `generate()` of 12 new tokens after the 30-token prompt (the local cache overflows
  into memory during decoding);
- `padded_ids`, `padded_mask` `[2, 30]` (row 1 left-padded by 6), `padded_generated` `[2, 42]`: the same with padding;
- `continued` `[2, 42 + 5 + 8]`: a second greedy `generate()` on the same cache, given the whole history plus 5 new
  prompt tokens (`prompt2`).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny model of conftest
from conftest import checkpoint_kernels_only, tiny_model  # noqa: E402

# tiny_model: vocab 99, hidden 32, 4 layers, window 8, last_context_length 4
CASES = {
    "bf16": dict(mem_layers=[1, 3], mem_dtype="bfloat16"),
    "fp32": dict(mem_layers=[1, 3], mem_dtype="float32"),
    # grouped-query attention, and a rope_theta that is not the default (published code_7b: 1e6)
    "gqa": dict(
        mem_layers=[1, 3], mem_dtype="float32", num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "topk": dict(mem_layers=[1, 3], mem_dtype="bfloat16", mem_top_k=5),
}
PROMPT_TOKENS, NEW_TOKENS, PROMPT2_TOKENS, MORE_TOKENS, PAD_TOKENS = 30, 12, 5, 8, 6


def random_ids(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 99, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def write_case(directory: Path, seed: int, **overrides) -> None:
    model = tiny_model(seed, **overrides)
    model.save_pretrained(directory)
    ids, prompt2 = random_ids(2, PROMPT_TOKENS, seed), random_ids(2, PROMPT2_TOKENS, seed + 100)
    logits = model(ids).logits
    first = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    history = torch.cat([first.sequences, prompt2], dim=1)
    continued = model.generate(history, cache=first.cache, max_new_tokens=MORE_TOKENS, do_sample=False)
    padded_ids, padded_mask = ids.clone(), torch.ones_like(ids)
    padded_ids[1, :PAD_TOKENS], padded_mask[1, :PAD_TOKENS] = 0, 0
    padded = model.generate(padded_ids, attention_mask=padded_mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    tensors = dict(
        ids=ids, logits=logits, generated=first.sequences, prompt2=prompt2, continued=continued,
        padded_ids=padded_ids, padded_mask=padded_mask, padded_generated=padded,
    )
    save_file({name: t.contiguous() for name, t in tensors.items()}, directory / "reference.safetensors")


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    # the checkpoint code's own kernels, which a remote-code load runs: the package's compiled memory attention gives
    # the same up to float rounding (tests/test_attention.py), not to 1e-5 on these deliberately sharp weights
    with checkpoint_kernels_only():
        for seed, (name, overrides) in enumerate(CASES.items()):
            write_case(out / name, seed, **overrides)
            print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
