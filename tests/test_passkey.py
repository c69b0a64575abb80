"""The passkey benchmark (`longllama.passkey`, docs/passkey.md#the-prompt): prompt format, exact token lengths, depth,
seeding, scoring, and `longllama-passkey` end to end on a tiny random LongLLaMA checkpoint.

Tokenizers are trained in-process on the passkey text: sentencepiece BPE with split digits, Llama-like (identity
normalisation, newlines as byte tokens) and OpenLLaMA-like (nmt_nfkc, newlines become spaces), plus a GPT-2-style
byte-level BPE (no BOS, "\\n\\n" one token). Their small vocabularies split words into pieces, which exercises filler
cuts inside words.
"""

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import Terminal

spm = pytest.importorskip("sentencepiece")

import longllama  # noqa: E402
import longllama.demo  # noqa: E402,F401  (monkeypatched below; the package loads it lazily)
from longllama import LongLlamaConfig, LongLlamaForCausalLM  # noqa: E402
from longllama import passkey  # noqa: E402
from longllama.modeling import LongLlamaTokenizer  # noqa: E402
from longllama.passkey import (  # noqa: E402
    FILLER, QUESTION, TASK, PasskeyPrompts, accuracy_table, key_line, main, parse_depths, parse_lengths,
    passkey_prompt, plan_trials, prompt_text, run_passkey,
)
from longllama.synthetic import word_tokenizer  # noqa: E402

CORPUS = [TASK, FILLER, QUESTION] + [key_line(n) for n in (123, 4567, 89012, 30405)]
SPM_OPTIONS = {
    "llama": dict(normalization_rule_name="identity", remove_extra_whitespaces=False),
    "openllama": dict(remove_extra_whitespaces=True),
}


def train_spm(path, **options) -> LongLlamaTokenizer:
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=writer, vocab_size=380, model_type="bpe",
        byte_fallback=True, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2, **options,
    )
    path.write_bytes(writer.getvalue())
    return LongLlamaTokenizer(vocab_file=str(path))


def train_byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(CORPUS * 5 + ["\n\n"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    found = {name: train_spm(root / f"{name}.model", **options) for name, options in SPM_OPTIONS.items()}
    found["byte-bpe"] = train_byte_bpe()
    return found


@pytest.fixture(scope="module")
def tokenizer(tokenizers):
    return tokenizers["llama"]


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A tiny random LongLLaMA (2 layers, memory in layer 1, window 32, last_context_length 16) and its tokenizer."""
    path = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    config = LongLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, last_context_length=16, mem_layers=[1],
        mem_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LongLlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def split_prompt(text: str) -> list[str]:
    lines = text.split("\n")
    assert len(lines) == 5, lines
    return lines


def is_filler(text: str) -> bool:
    """A prefix of the filler sentence group repeated and joined by spaces."""
    return " ".join([FILLER] * (len(text) // len(FILLER) + 2)).startswith(text)


# =========================================================================== prompts


def test_prompt_text_lines():
    text = prompt_text(4242, "filler one", "filler two")
    assert text == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
        "you about the important information there.\nfiller one\n"
        "The pass key is 4242. Remember it. 4242 is the pass key.\nfiller two\nWhat is the pass key? The pass key is"
    )


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_structure(tokenizer, depth):
    prompts = PasskeyPrompts(tokenizer)
    task, before, key, after, question = split_prompt(prompts.text(900, depth, 31337))
    assert (task, key, question) == (TASK, key_line(31337), QUESTION)
    assert is_filler(before) and is_filler(after)
    assert len(before + after) > 3 * len(FILLER), "several filler groups"
    assert (before == "") == (depth == 0.0) and (after == "") == (depth == 1.0)


@pytest.mark.parametrize("name", list(SPM_OPTIONS) + ["byte-bpe"])
def test_ids_are_the_tokenizers_ids_at_exact_lengths(tokenizers, name):
    """Every length from the minimum up (several filler periods, so cuts at every token of a period) and random
    depths and keys: `input_ids == tokenizer(text).input_ids` and `len(input_ids) == length`."""
    tok = tokenizers[name]
    prompts = PasskeyPrompts(tok)
    period = len(prompts.unit)
    rng = random.Random(0)
    start = prompts.minimum_length(49999)
    for length in list(range(start, start + 3 * period)) + [rng.randrange(start, 3000) for _ in range(20)]:
        key, depth = rng.randrange(1, 50000), rng.choice([0.0, 0.1, 0.5, 0.9, 1.0, rng.random()])
        ids, answer = prompts.build(length, depth, key)
        assert len(ids) == length
        assert ids == tok(prompts.text(length, depth, key)).input_ids, (length, depth, key)
        assert tok.decode(answer).strip() == str(key)


def test_long_prompt(tokenizer):
    """100k tokens: built from repeated tokens, still exactly the tokenizer's ids of the text."""
    ids, answer = passkey_prompt(tokenizer, 100_000, 0.4, 777)
    assert len(ids) == 100_000 and ids[0] == tokenizer.bos_token_id
    assert ids == tokenizer(PasskeyPrompts(tokenizer).text(100_000, 0.4, 777)).input_ids
    assert tokenizer.convert_ids_to_tokens(answer) == ["▁", "7", "7", "7"]


def test_depth_places_the_key_line(tokenizer):
    prompts = PasskeyPrompts(tokenizer)
    length, key = 2000, 123
    filler = length - prompts.minimum_length(key)
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        before, after = prompts.layout(length, depth, key)
        assert before + after == filler
        assert abs(before - depth * filler) <= 2
        text = prompts.text(length, depth, key)
        positions.append(len(tokenizer(text[: text.index(key_line(key))]).input_ids))
    assert positions == sorted(positions)
    assert positions[0] < 70 and positions[-1] > length - 70, "depth 0: after the task line; 1: before the question"


def test_answer_is_the_key_after_the_question(tokenizer):
    ids, answer = passkey_prompt(tokenizer, 400, 0.5, 12345)
    assert tokenizer.convert_ids_to_tokens(answer) == ["▁", "1", "2", "3", "4", "5"]
    continued = tokenizer(PasskeyPrompts(tokenizer).text(400, 0.5, 12345) + " 12345").input_ids
    assert continued == ids + answer


def test_prompt_errors(tokenizer):
    prompts = PasskeyPrompts(tokenizer)
    minimum = prompts.minimum_length(123)
    with pytest.raises(ValueError, match=f"at least {minimum}"):
        prompts.build(minimum - 1, 0.5, 123)
    assert len(prompts.build(minimum, 0.5, 123)[0]) == minimum
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        prompts.build(500, 1.5, 123)
    for key in (0, 50000, "12"):
        with pytest.raises(ValueError, match=r"\[1, 50000\)"):
            prompts.build(500, 0.5, key)


def test_tokenizer_that_splits_the_key_differently_is_refused():
    """A word-level tokenizer: "12345." in the key line is another token than "12345" after the question."""
    words = " ".join(CORPUS).split() + ["12345"]
    with pytest.raises(ValueError, match="splits the key 12345 differently"):
        passkey_prompt(word_tokenizer(words), 300, 0.5, 12345)
    with pytest.raises(ValueError, match="cannot write the key"):
        passkey_prompt(word_tokenizer(" ".join(CORPUS).split()), 300, 0.5, 777)  # unknown word on both sides


# =========================================================================== trials and scoring


def test_plan_is_seeded_and_spread_over_depths():
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    plan = plan_trials([1000, 2000], depths, 10, seed=3)
    assert plan == plan_trials([1000, 2000], depths, 10, seed=3)
    assert [t.key for t in plan] != [t.key for t in plan_trials([1000, 2000], depths, 10, seed=4)]
    assert [t.length for t in plan] == [1000] * 10 + [2000] * 10
    for length in (1000, 2000):
        assert sorted(t.depth for t in plan if t.length == length) == sorted(depths * 2)
    assert all(1 <= t.key < 50000 for t in plan)
    few = plan_trials([1000], depths, 3, seed=0)
    assert len({t.depth for t in few}) == 3, "fewer trials than depths: distinct depths"
    with pytest.raises(ValueError, match="at least one trial"):
        plan_trials([1000], depths, 0)


class FakeModel:
    """Answers by reading the key from the prompt; wrong (key + 1) when the key line is in the first half."""

    device = torch.device("cpu")

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.calls.append(dict(kwargs, max_new_tokens=max_new_tokens, length=input_ids.shape[1]))
        text = self.tokenizer.decode(input_ids[0])
        key = int(re.search(r"pass key is (\d+)\.", text).group(1))
        first_half = text.index("pass key is") < len(text) / 2
        answer = self.tokenizer(f"{QUESTION} {key + first_half} is it", add_special_tokens=False).input_ids
        answer = answer[len(self.tokenizer(QUESTION, add_special_tokens=False).input_ids) :]
        return torch.cat([input_ids, torch.tensor([answer[:max_new_tokens]])], dim=1)


def test_scoring_with_a_fake_model(tokenizer):
    model, seen = FakeModel(tokenizer), []
    results = run_passkey(model, tokenizer, [300, 600], [0.0, 1.0], trials=4, seed=1, last_context_length=16,
                          on_result=seen.append, progress=False)
    assert seen == results and len(results) == 8
    for result in results:
        assert result["correct"] == (result["depth"] == 1.0)
        assert result["predicted"].split()[0] == str(result["key"] + (result["depth"] == 0.0))
        assert result["seconds"] > 0 and result["tokens_per_s"] == pytest.approx(result["length"] / result["seconds"])
        assert {"length", "depth", "key", "predicted", "correct", "seconds", "tokens_per_s"} <= set(result)
    call = model.calls[0]
    assert call["do_sample"] is False and call["last_context_length"] == 16
    assert call["max_new_tokens"] == len(results[0]["answer_ids"]) + 4
    assert [c["length"] for c in model.calls] == [r["length"] for r in results]
    table = accuracy_table(results)
    assert re.search(r"300 \|\s+0/2 \|\s+2/2 \|\s+50%", table), table
    assert table.endswith("4/8 correct")


def test_correct_means_the_key_tokens_come_first():
    assert passkey.is_correct([5, 6, 7, 99], [5, 6, 7])
    assert not passkey.is_correct([5, 6], [5, 6, 7])
    assert not passkey.is_correct([5, 6, 8], [5, 6, 7])


def test_parse_lengths_and_depths():
    assert parse_lengths("4k,16K, 100k,256k,1500,1.5k") == [4000, 16000, 100000, 256000, 1500]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("4x", "", "0", "-5", "1.0001k", "2.5"):
        with pytest.raises(Exception, match="invalid length"):
            parse_lengths(bad)
    with pytest.raises(Exception, match="outside"):
        parse_depths("0,1.5")
    with pytest.raises(Exception, match="invalid depth"):
        parse_depths("half")


# =========================================================================== command line


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("MODEL", "k = 1000", "--depths", "--trials", "--json", "--plot", "--demo", "Ctrl-C"):
        assert text in out


def test_cli_end_to_end(checkpoint, tmp_path, capsys):
    results_file, plot_file = tmp_path / "out" / "passkey.json", tmp_path / "passkey.png"
    code = main([str(checkpoint), "--lengths", "250,0.4k", "--depths", "0,0.5,1", "--trials", "3", "--seed", "7",
                 "--threads", "1", "--last-context-length", "8", "--json", str(results_file), "--plot", str(plot_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    saved = json.loads(results_file.read_text())
    assert saved["complete"] is True and saved["settings"]["lengths"] == [250, 400]
    assert saved["settings"]["model_type"] == "longllama" and saved["settings"]["last_context_length"] == 8
    results = saved["results"]
    assert [(r["length"], r["depth"], r["key"]) for r in results] == [
        (t.length, t.depth, t.key) for t in plan_trials([250, 400], [0.0, 0.5, 1.0], 3, seed=7)
    ]
    assert all(isinstance(r["correct"], bool) and r["tokens_per_s"] > 0 for r in results)
    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "depth 0.5" in out and re.search(r"^\s*400 \|", out, re.M) and "correct" in out
    assert not list(tmp_path.glob("out/*.tmp")), "the temporary file was renamed"


def test_cli_interrupt_keeps_finished_trials(checkpoint, tmp_path, capsys, monkeypatch):
    generate, calls = LongLlamaForCausalLM.generate, []

    def interrupt_second_trial(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LongLlamaForCausalLM, "generate", interrupt_second_trial)
    results_file = tmp_path / "partial.json"
    code = main([str(checkpoint), "--lengths", "250", "--trials", "4", "--json", str(results_file)])
    out, err = capsys.readouterr()
    assert code == 130
    saved = json.loads(results_file.read_text())
    assert saved["complete"] is False and len(saved["results"]) == 1
    assert "Interrupted after 1 finished trial" in err
    assert re.search(r"^\s*250 \|", out, re.M), "the partial table is printed"


LONG_RUN = ["--lengths", "600", "--trials", "2"]  # 600 tokens: 19 windows of 32 tokens and the final 16


def test_cli_writes_no_progress_bar_to_a_file(checkpoint, tmp_path):
    """stderr redirected to a file (a log, CI): no bar of the trials, of the model's windows or of transformers'
    weight loading, whose carriage-return lines used to fill such logs (1,240 lines for one demo run)."""
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        result = subprocess.run(
            [shutil.which("longllama-passkey"), str(checkpoint), *LONG_RUN], stdout=subprocess.PIPE, stderr=stderr,
            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
        )
    assert result.returncode == 0, log.read_text()[-3000:]
    assert "/2 correct" in result.stdout
    assert log.read_text() == ""


def test_cli_progress_bars_on_a_terminal_only(checkpoint, tmp_path, progress_bars):
    """In-process, with the model's bar drawn at once (`progress_bars`): a terminal gets the trials' and the
    windows' bars, a file none."""
    terminal = Terminal()
    with contextlib.redirect_stderr(terminal), contextlib.redirect_stdout(io.StringIO()):
        assert main([str(checkpoint), *LONG_RUN]) == 0
    assert "passkey: 100%" in terminal.getvalue() and "LongLLaMA windows" in terminal.getvalue()
    log = tmp_path / "stderr.log"
    with open(log, "w") as file, contextlib.redirect_stderr(file), contextlib.redirect_stdout(io.StringIO()):
        assert main([str(checkpoint), *LONG_RUN]) == 0
    assert log.read_text() == ""


@pytest.fixture
def no_model_load(monkeypatch):
    """Errors must come before the model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(passkey, "load_model", refuse)


def run_error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_errors_before_compute(checkpoint, tmp_path, capsys, monkeypatch, no_model_load):
    err = run_error([str(tmp_path / "missing"), "--lengths", "1k"], capsys)
    assert "expected a directory with config.json" in err
    minimum = PasskeyPrompts(LongLlamaTokenizer.from_pretrained(checkpoint)).minimum_length(49999)
    err = run_error([str(checkpoint), "--lengths", "50,1k"], capsys)
    assert "[50]" in err and re.search(r"at least \d+", err)
    assert int(re.search(r"at least (\d+)", err).group(1)) <= minimum
    assert "MODEL" in run_error([], capsys) and "not both" in run_error([str(checkpoint), "--demo"], capsys)
    monkeypatch.setattr(longllama.demo, "DEMO_DIR", tmp_path / "no_demo")  # an incomplete installation
    err = run_error(["--demo"], capsys)
    assert "--demo" in err and "lacks config.json" in err and "Reinstall" in err
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    err = run_error([str(llama), "--tokenizer", str(checkpoint), "--last-context-length", "8"], capsys)
    assert "--last-context-length is a LongLLaMA option" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "--plot needs matplotlib" in run_error([str(checkpoint), "--plot", str(tmp_path / "x.png")], capsys)


@pytest.mark.parametrize("flags, message", [
    (["--lengths", "4k,lots"], "invalid length 'lots'"),
    (["--depths", "0,2"], "outside [0, 1]"),
    (["--depths", "0,x"], "invalid depth 'x'"),
])
def test_cli_unparsable_values(checkpoint, capsys, no_model_load, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_refuses_a_tokenizer_that_splits_the_key(checkpoint, tmp_path, capsys, no_model_load):
    words = " ".join(CORPUS).split() + [str(n) for n in range(1, 50000)]  # every key is a word, "12345." is not
    word_tokenizer(words).save_pretrained(tmp_path / "words")
    err = run_error([str(checkpoint), "--tokenizer", str(tmp_path / "words"), "--lengths", "300"], capsys)
    assert "differently in the key line" in err and "split_digits" in err


# =========================================================================== bring your own filler (--filler)

HAYSTACK = ("The harbour was quiet before dawn.\nFishermen mended their nets by the old wall, and gulls circled the "
            "masts.\n") * 3 + "".join(f"Line {i} of a long document that never repeats.\n" for i in range(400))


def test_filler_prompts_exact_lengths_and_in_order(tokenizer):
    prompts = passkey.FillerPrompts(tokenizer, HAYSTACK)
    for length, depth in ((300, 0.0), (800, 0.5), (2000, 1.0), (5000, 0.3)):
        ids, answer = prompts.build(length, depth, 4321)
        assert len(ids) == length and ids[0] == tokenizer.bos_token_id
        text = tokenizer.decode(ids, skip_special_tokens=True)
        lines = text.split("\n")
        assert lines[0] == TASK and lines[-1] == QUESTION
        key_index = lines.index(key_line(4321))
        before, after = "\n".join(lines[1:key_index]), "\n".join(lines[key_index + 1 : -1])
        assert HAYSTACK.startswith(before)  # the text from its beginning ...
        if length < 2000:  # ... and after the key line where it stopped (no repetition needed yet)
            assert (before + after).replace("\n", "") in HAYSTACK.replace("\n", "")
        assert tokenizer.decode(answer).strip() == "4321"
    shallow, deep = (prompts.build(3000, d, 4321)[0] for d in (0.1, 0.9))
    key_ids = passkey.FillerPrompts._after_sentence(prompts, "\n{line}\n", 4321)
    position = lambda ids: next(i for i in range(len(ids)) if ids[i : i + len(key_ids)] == key_ids)  # noqa: E731
    assert position(shallow) < 600 < 2400 < position(deep)


def test_short_filler_is_repeated(tokenizer):
    prompts = passkey.FillerPrompts(tokenizer, "A quiet fox walked past the mill.")
    ids, _ = prompts.build(4000, 0.5, 777)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) == 4000 and text.count("A quiet fox walked past the mill.") > 100


def test_filler_file_errors_in_one_line(checkpoint, tmp_path, capsys, no_model_load):
    empty, latin, good = tmp_path / "empty.txt", tmp_path / "latin.txt", tmp_path / "good.txt"
    empty.write_text("  \n\n")
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    for path, message in ((tmp_path / "none.txt", "no such file"), (empty, "the file is empty"),
                          (latin, "not UTF-8 text (invalid byte at offset 3)"), (tmp_path, "no such file")):
        err = run_error([str(checkpoint), "--lengths", "300", "--filler", str(path)], capsys)
        assert message in err and err.strip().count("\n") == 0, err
    good.write_text(HAYSTACK)
    err = run_error([str(checkpoint), "--lengths", "20", "--filler", str(good)], capsys)
    assert "shorter than the prompt's fixed part" in err


def test_cli_with_filler(checkpoint, tmp_path, capsys):
    haystack, results_file = tmp_path / "haystack.txt", tmp_path / "pk.json"
    haystack.write_text(HAYSTACK)
    code = main([str(checkpoint), "--lengths", "300,600", "--trials", "2", "--threads", "1", "--filler", str(haystack),
                 "--json", str(results_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    saved = json.loads(results_file.read_text())
    assert saved["settings"]["filler"] == str(haystack) and len(saved["settings"]["filler_sha256"]) == 64
    assert len(saved["results"]) == 4 and re.search(r"^\s*600 \|", out, re.M)
