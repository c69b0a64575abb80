"""LongLlamaTokenizer gives exactly sentencepiece's ids (plus BOS), on tiny sentencepiece models trained offline.

Two model flavours: Llama-like (identity normalisation, whitespace kept) and OpenLLaMA-like (default nmt_nfkc
normaliser, `remove_extra_whitespaces=True`), each as BPE and unigram; all with byte fallback and split digits.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")

from transformers import AutoTokenizer  # noqa: E402

import longllama.modeling  # noqa: E402
from longllama.modeling.tokenization_longllama import LongLlamaTokenizer  # noqa: E402

CODE_FILE = Path(longllama.modeling.__file__).parent / "tokenization_longllama.py"

CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "def forward(self, x):\n    return self.linear(x) + 1\n",
    "In 2023 there were 365 days and 12 months.",
    "Memory layers attend to keys from previous context windows.",
    "  leading spaces   and\truns of\t\twhitespace",
    "Focused Transformer: contrastive training for context scaling.",
]

TEXTS = [
    "",
    "Hello world",
    " leading space",
    "  two leading spaces",
    "runs   of    spaces",
    "trailing spaces   ",
    "line one\nline two\n\nline four",
    "tab\tseparated\t\tcolumns",
    "def f(x):\n    if x:\n        return 1\n    return 2",
    "digits 1234567890 and 3.14159",
    "unicode: ünïcödé, 日本語, emoji 😀🚀",
    "\n leading newline",
]

IDENTITY = dict(normalization_rule_name="identity", remove_extra_whitespaces=False)
OPENLLAMA = dict(remove_extra_whitespaces=True)  # nmt_nfkc default normaliser, as OpenLLaMA v1


def train_model(model_type: str, **options) -> bytes:
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=writer,
        vocab_size=400,
        model_type=model_type,
        byte_fallback=True,
        split_digits=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    return writer.getvalue()


FLAVOURS = {
    "bpe-identity": ("bpe", IDENTITY),
    "bpe-openllama": ("bpe", OPENLLAMA),
    "unigram-identity": ("unigram", IDENTITY),
    "unigram-openllama": ("unigram", OPENLLAMA),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spm")
    paths = {}
    for name, (model_type, options) in FLAVOURS.items():
        path = root / f"{name}.model"
        path.write_bytes(train_model(model_type, **options))
        paths[name] = path
    return paths


def checkpoint_dir(model: Path, dst: Path) -> Path:
    """What the converter writes: tokenizer.model + tokenizer_config.json + tokenization_longllama.py."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model, dst / "tokenizer.model")
    shutil.copy2(CODE_FILE, dst / "tokenization_longllama.py")
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_longllama.LongLlamaTokenizer", None]},
        "tokenizer_class": "LongLlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_ids_equal_sentencepiece_with_bos(models, flavour):
    sp = spm.SentencePieceProcessor(model_file=str(models[flavour]))
    tok = LongLlamaTokenizer(vocab_file=str(models[flavour]))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.add_bos_token and not tok.add_eos_token
    assert len(tok) == sp.get_piece_size()
    for text in TEXTS:
        expected = sp.encode(text)
        assert tok(text).input_ids == [1] + expected, repr(text)
        assert tok.encode(text) == [1] + expected, repr(text)
        assert tok.encode(text, add_special_tokens=False) == expected, repr(text)
    byte_pieces = {sp.id_to_piece(i) for i in sp.encode("😀🚀") if sp.is_byte(i)}
    assert byte_pieces, "emoji go through byte fallback"
    assert tok.tokenize("1234") == sp.encode("1234", out_type=str)
    assert len(sp.encode("1234")) >= 4, "split_digits"


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_decode_inverts_encode(models, flavour):
    sp = spm.SentencePieceProcessor(model_file=str(models[flavour]))
    tok = LongLlamaTokenizer(vocab_file=str(models[flavour]))
    for text in TEXTS:
        ids = tok(text).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), repr(text)
        assert tok.decode(ids) == "<s>" + sp.decode(ids[1:]), repr(text)
        if flavour.endswith("identity"):  # whitespace kept: exact inverse
            assert tok.decode(ids, skip_special_tokens=True) == text, repr(text)
    ordinary = "Hello world, 2023 😀 ünïcode."
    assert tok.decode(tok(ordinary).input_ids, skip_special_tokens=True) == ordinary
    assert tok.decode(tok.encode("a") + [2], skip_special_tokens=True) == "a"
    assert tok.decode(tok.encode("a") + [2]) == "<s>a</s>"
    assert tok.batch_decode([tok.encode("x y"), tok.encode("z")], skip_special_tokens=True) == ["x y", "z"]


def test_bos_eos_switches(models):
    path = str(models["bpe-identity"])
    sp = spm.SentencePieceProcessor(model_file=path)
    ids = sp.encode("Hello world")
    assert LongLlamaTokenizer(vocab_file=path, add_eos_token=True)("Hello world").input_ids == [1] + ids + [2]
    assert LongLlamaTokenizer(vocab_file=path, add_bos_token=False)("Hello world").input_ids == ids
    tok = LongLlamaTokenizer(vocab_file=path)
    tok.add_bos_token = False
    tok.add_eos_token = True
    assert tok("Hello world").input_ids == ids + [2]


def test_batch_left_padding(models):
    path = str(models["bpe-openllama"])
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = LongLlamaTokenizer(vocab_file=path, pad_token="<unk>", padding_side="left")
    assert tok.pad_token_id == 0 and tok.padding_side == "left"
    texts = ["short", "a much longer sentence with  spaces and 123", ""]
    batch = tok(texts, padding=True, return_tensors="pt")
    width = batch.input_ids.shape[1]
    for row, mask, text in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), texts):
        expected = [1] + sp.encode(text)
        assert row == [0] * (width - len(expected)) + expected
        assert mask == [0] * (width - len(expected)) + [1] * len(expected)
    # eos as pad also works
    tok_eos = LongLlamaTokenizer(vocab_file=path, padding_side="left")
    tok_eos.pad_token = tok_eos.eos_token
    assert tok_eos(texts, padding=True).input_ids[0][0] == 2


def test_save_and_reload(models, tmp_path):
    path = str(models["unigram-openllama"])
    tok = LongLlamaTokenizer(vocab_file=path, add_eos_token=True)
    files = tok.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "tokenizer.model").read_bytes() == Path(path).read_bytes()
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is True
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_longllama.LongLlamaTokenizer"
    assert (saved / "tokenization_longllama.py").is_file(), "remote code copied by save_pretrained"
    assert files
    again = LongLlamaTokenizer.from_pretrained(saved)
    assert isinstance(again, LongLlamaTokenizer) and again.add_eos_token
    for text in TEXTS:
        assert again(text).input_ids == tok(text).input_ids, repr(text)


SUBPROCESS = r"""
import importlib.abc, json, sys

class BlockLongllama(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "longllama":
            raise ImportError("longllama is blocked in this test")
        return None

sys.meta_path.insert(0, BlockLongllama())
try:
    import longllama  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the longllama import block did not work")
from transformers import AutoTokenizer

texts = json.loads(sys.argv[1])
results = {}
for directory in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    results[directory] = {"cls": type(tok).__name__, "ids": [tok(t).input_ids for t in texts]}
assert not any(m == "longllama" or m.startswith("longllama.") for m in sys.modules), "longllama leaked in"
print(json.dumps(results))
"""


def test_autotokenizer_remote_code_without_package(models, tmp_path):
    """A checkpoint directory loads LongLlamaTokenizer as remote code, with the longllama package unimportable."""
    flavours = ("bpe-openllama", "unigram-identity")
    directories = [str(checkpoint_dir(models[f], tmp_path / f)) for f in flavours]
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SUBPROCESS), json.dumps(TEXTS), *directories],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for flavour, directory in zip(flavours, directories):
        sp = spm.SentencePieceProcessor(model_file=str(models[flavour]))
        assert results[directory]["cls"] == "LongLlamaTokenizer"
        assert results[directory]["ids"] == [[1] + sp.encode(t) for t in TEXTS]


def test_autotokenizer_in_process(models, tmp_path):
    directory = checkpoint_dir(models["bpe-openllama"], tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    assert type(tok).__name__ == "LongLlamaTokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(models["bpe-openllama"]))
    for text in TEXTS:
        assert tok(text).input_ids == [1] + sp.encode(text), repr(text)


def test_transformers_llama_tokenizer_differs_on_whitespace(models, tmp_path):
    """Why the class exists: transformers 5's (tokenizers-based) LlamaTokenizer, loaded from the same
    tokenizer.model, does not reproduce sentencepiece on whitespace for an OpenLLaMA-like model."""
    path = models["bpe-openllama"]
    directory = tmp_path / "llama"
    directory.mkdir()
    shutil.copy2(path, directory / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(directory)
    assert type(hf).__name__ != "LongLlamaTokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    ours = LongLlamaTokenizer(vocab_file=str(path))
    whitespace = ["  two leading spaces", "runs   of    spaces", "def f(x):\n    if x:\n        return 1"]
    differing = [t for t in whitespace if hf(t).input_ids != [1] + sp.encode(t)]
    assert differing, "transformers' LlamaTokenizer now matches sentencepiece; LongLlamaTokenizer may be redundant"
    for text in differing:
        assert ours(text).input_ids == [1] + sp.encode(text)
    assert hf("Hello world").input_ids == [1] + sp.encode("Hello world"), "ordinary text agrees"


def test_decoding_a_continuation_is_what_llama_does(models, tmp_path):
    """pipeline("text-generation") decodes only the new tokens (transformers 5.24) and appends them to the prompt
    text: the leading space of a continuation is dropped by sentencepiece's decode, exactly as by transformers'
    LlamaTokenizer loaded from the same model (measured: "...The pass key is123" from both)."""
    path = models["bpe-openllama"]
    directory = tmp_path / "llama"
    directory.mkdir()
    shutil.copy2(path, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    hf, ours = AutoTokenizer.from_pretrained(directory), LongLlamaTokenizer(vocab_file=str(path))
    for prompt, answer in [("The pass key is", " 123"), ("Hello", " world, again"), ("x =", " 1")]:
        full = ours(prompt + answer).input_ids
        continuation = full[len(ours(prompt).input_ids):]
        assert ours.decode(continuation) == hf.decode(continuation), (prompt, answer)
        assert ours.decode(full, skip_special_tokens=True) == prompt + answer  # whole texts keep every space


# --------------------------------------------------------------------------- through the converter


def test_converter_ships_the_exact_tokenizer_and_to_llama_removes_it(models, tmp_path):
    """longllama-convert on a Llama checkpoint with an OpenLLaMA-like tokenizer.model: AutoTokenizer on DST gives
    sentencepiece's ids (with BOS) on whitespace-heavy text, and pads (with EOS when the source names no pad token);
    --to-llama goes back to transformers' LlamaTokenizer."""
    from transformers import AutoTokenizer

    from longllama.conversion.convert import convert
    from longllama.conversion.to_llama import to_llama
    from test_conversion import OPTIONS, tiny_llama

    src = tmp_path / "llama"
    tiny_llama().save_pretrained(src)
    shutil.copy2(models["bpe-openllama"], src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "pad_token": "<unk>"}))
    dst = convert(src, tmp_path / "long", **OPTIONS)

    config = json.loads((dst / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LongLlamaTokenizer" and config["pad_token"] == "<unk>"
    assert (dst / "tokenization_longllama.py").is_file()
    tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    for text in TEXTS:
        assert tokenizer(text).input_ids == [1] + sp.encode(text), repr(text)

    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))  # no pad token
    padded = convert(src, tmp_path / "padded", **OPTIONS)
    assert json.loads((padded / "tokenizer_config.json").read_text())["pad_token"] == "</s>"
    batch = AutoTokenizer.from_pretrained(padded, trust_remote_code=True)(["a", "bb b"], padding=True)
    assert len(set(map(len, batch.input_ids))) == 1 and 0 in batch.attention_mask[0]

    back = to_llama(dst, tmp_path / "back")
    config = json.loads((back / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and "auto_map" not in config
    assert not (back / "tokenization_longllama.py").exists()
    assert AutoTokenizer.from_pretrained(back)("Hello world").input_ids[0] == 1
