"""benchmarks/long_context_ppl.py: spans, and one forward call with logits_to_keep scoring what a full forward scores."""

import importlib.util
import math
from pathlib import Path

import torch
from conftest import tiny_model

spec = importlib.util.spec_from_file_location(
    "long_context_ppl", Path(__file__).resolve().parents[1] / "benchmarks" / "long_context_ppl.py")
long_context_ppl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(long_context_ppl)


def test_spans_leave_the_longest_context_before_each():
    assert long_context_ppl.spans_of(1000, 600, 100, 3) == [700, 850, 1000]
    assert long_context_ppl.spans_of(1000, 600, 100, 1) == [1000]
    assert long_context_ppl.spans_of(650, 600, 100, 3) == []


def test_span_loss_equals_the_loss_of_a_full_forward():
    model = tiny_model().eval()  # window 8, memory layer 1: the context runs through several windows and memory
    ids = torch.randint(3, model.config.vocab_size, (60,)).tolist()
    loss, count = long_context_ppl.span_loss(model, ids, 12)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[-13:-1], torch.tensor(ids[-12:]), reduction="sum").item()
    assert count == 12 and math.isclose(loss, expected, rel_tol=1e-5)


def test_summary_is_the_perplexity_over_all_scored_tokens():
    results = [{"arm": "fot", "context": 256, "loss": 2.0 * 10, "tokens": 10},
               {"arm": "fot", "context": 256, "loss": 4.0 * 30, "tokens": 30}]
    assert math.isclose(long_context_ppl.summarize(results)["fot"][256], math.exp(3.5))
    assert "| fot | 33.115 | 40 |" in long_context_ppl.table(results)
