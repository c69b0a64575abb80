"""`longllama-train` (`longllama.train`) end to end on a tiny model, and the FoT distraction measure
(`longllama.evaluation.positive_attention_mass`, docs/training.md#distraction).

Every run trains from scratch (`--init-config`) a LongLLaMA of hidden 32, 2 layers, 2 heads, memory in layer 1,
window 16, on ~200 `FactsTask` documents (exactly 2 windows each) with the word-level tokenizer: a step takes
milliseconds. Runs go through `main([...])` in-process; the console script and `accelerate launch` (DDP on 2 CPU
processes) run as subprocesses in the slow tests.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model
from safetensors.torch import load_file

from longllama import LongLlamaConfig, LongLlamaForCausalLM
from longllama.data import DocumentSource, PackedBatches, TokenStream
from longllama.evaluation import distraction_prompt, positive_attention_mass, span_attention_mass
from longllama.synthetic import FactsTask
from longllama.train import (
    RESUME_KEYS, TrainConfig, check_config, cross_batch_range_at, cross_batch_schedule, load_config, lr_lambda,
    main,
)

WINDOW = 16
TASK = FactsTask(window=WINDOW, windows=2, key_length=2, symbols=8, values=8)


# =========================================================================== fixtures


@dataclasses.dataclass
class Workspace:
    root: Path
    config: Path  # config.json of the tiny LongLLaMA
    tokenizer: Path  # tokenizer directory
    data: Path  # ~200 FactsTask documents (.jsonl)

    def args(self, output: Path | str, *extra, data: Path | None = None) -> list[str]:
        """The flags of a small FoT run (batch 8, k=2, d=3, lr 3e-3); `extra` flags come last (argparse: last wins)."""
        return [
            "--init-config", str(self.config), "--tokenizer", str(self.tokenizer), "--data", str(data or self.data),
            "--batch-size", "8", "--pack-size", "2", "--cross-batch-range", "3", "--lr", "3e-3",
            "--output-dir", str(output), *map(str, extra),
        ]


def write_model_config(path: Path, tokenizer, **overrides) -> Path:
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=WINDOW, last_context_length=WINDOW, mem_layers=[1],
        mem_dtype="float32", tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(overrides)
    LongLlamaConfig(**fields).to_json_file(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("train"), documents=200)


def make_workspace(root: Path, documents: int) -> Workspace:
    """In `root`: the task's tokenizer, a tiny model config and `documents` FactsTask documents (seed 0)."""
    tokenizer = TASK.tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    config = write_model_config(root / "config.json", tokenizer)
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(documents):
            f.write(json.dumps(TASK.document(rng)) + "\n")
    return Workspace(root, config, root / "tokenizer", root / "data.jsonl")


def run(argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` with its stdout and stderr captured (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def assert_not_trained(output: Path):
    assert not (output / "model").exists(), "a failed run must not write a model"
    assert not (output / "checkpoints").exists() or not any((output / "checkpoints").iterdir())
    assert not (output / "log.jsonl").exists() or not (output / "log.jsonl").read_text()


@pytest.fixture(scope="module")
def run_a(ws) -> Path:
    """6 steps, a checkpoint every 3, a log line every step."""
    output = ws.root / "A"
    code, out, err = run(ws.args(output, "--steps", 6, "--save-every", 3, "--log-every", 1))
    assert code == 0, err
    assert f"Final model: {output / 'model'}" in out
    return output


@pytest.fixture(scope="module")
def run_b(ws) -> tuple[Path, str]:
    """The same run interrupted: 3 steps (saved at the end), then resumed with --resume auto up to 6 steps. Logs
    every 2 steps."""
    output = ws.root / "B"
    code, _, err = run(ws.args(output, "--steps", 3, "--log-every", 2))
    assert code == 0, err
    assert (output / "checkpoints" / "step-3").is_dir()
    code, out, err = run(ws.args(output, "--steps", 6, "--log-every", 2, "--resume", "auto"))
    assert code == 0, err
    return output, out


# =========================================================================== command line and configuration


def test_help_mentions_the_main_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: longllama-train")
    for option in ("--config", "--model", "--init-config", "--tokenizer", "--data", "--mode", "--window",
                   "--batch-size", "--pack-size", "--cross-batch-range", "--steps", "--lr", "--grad-accum",
                   "--gradient-checkpointing", "--output-dir", "--save-every", "--resume", "--eval-every",
                   "--evaluate", "--seed", "--mixed-precision", "--no-stepping"):
        assert option in text, option


def test_console_script_help():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = shutil.which("longllama-train")
    assert script, "the longllama-train console script is not installed"
    for command in ([script, "--help"], [sys.executable, "-m", "longllama.train", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "--cross-batch-range" in result.stdout and "--init-config" in result.stdout


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_and_overrides(tmp_path, suffix):
    values = {"data": "docs.jsonl", "steps": 7, "batch_size": 4, "lr": 0.001, "stepping": False, "mode": "memory",
              "eval_data": ["a.txt", "b.txt"]}
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(values))
    else:
        path.write_text(json.dumps(values))
    cfg = load_config(["--config", str(path)])
    assert cfg.data == ["docs.jsonl"]  # a single string becomes a list
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.stepping, cfg.mode) == (7, 4, 0.001, False, "memory")
    assert cfg.eval_data == ["a.txt", "b.txt"]
    assert cfg.pack_size == TrainConfig.pack_size  # untouched default
    # flags win over the file (also booleans and lists)
    cfg = load_config(["--config", str(path), "--steps", "9", "--stepping", "--data", "x.txt",
                       "--lr", "3e-3", "--mode", "fot"])
    assert (cfg.steps, cfg.stepping, cfg.data, cfg.lr, cfg.mode, cfg.batch_size) == (
        9, True, ["x.txt"], 0.003, "fot", 4)
    assert isinstance(cfg.lr, float) and isinstance(cfg.steps, int)
    # unknown keys in the file are an error naming them
    values["cross_batch"] = 2
    path.write_text(yaml_or_json(values, suffix))
    with pytest.raises(ValueError, match="Unknown option.*cross_batch"):
        load_config(["--config", str(path)])


def yaml_or_json(values: dict, suffix: str) -> str:
    if suffix == ".json":
        return json.dumps(values)
    import yaml

    return yaml.safe_dump(values)


def test_several_data_paths_on_the_command_line():
    cfg = load_config(["--data", "a.jsonl", "docs/", "--eval-data", "b.txt", "c.txt"])
    assert cfg.data == ["a.jsonl", "docs/"] and cfg.eval_data == ["b.txt", "c.txt"]


def test_config_file_errors_through_main(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 3, "bogus_key": 1}))
    assert main(["--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "bogus_key" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_yaml_scientific_notation_is_a_number_or_a_clear_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3e-3\nsteps: 2\n")
    try:
        cfg = load_config(["--config", str(path)])
    except ValueError as error:
        assert "lr" in str(error)
        return
    assert isinstance(cfg.lr, float) and cfg.lr == 0.003


def test_lr_schedule():
    cfg = TrainConfig(steps=10, warmup_steps=2, lr_schedule="cosine")
    factor = lr_lambda(cfg)
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0)
    assert factor(6) == pytest.approx(0.55)
    assert factor(10) == pytest.approx(0.1) and factor(50) == pytest.approx(0.1)
    assert all(factor(s) >= factor(s + 1) for s in range(2, 12))
    assert lr_lambda(TrainConfig(steps=10))(7) == 1.0


# =========================================================================== a short run


def test_short_run_writes_a_loadable_model_and_a_log(ws, run_a):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_a / "model")
    assert type(model) is LongLlamaForCausalLM
    assert model.config.mem_layers == [1] and model.config.vocab_size == len(TASK.tokenizer())
    assert model.config.use_cache  # training turns the cache off; the saved model is for inference
    tokenizer = AutoTokenizer.from_pretrained(run_a / "model")
    expected = TASK.tokenizer()("k1 v2 ;", add_special_tokens=False)["input_ids"]
    assert tokenizer("k1 v2 ;", add_special_tokens=False)["input_ids"] == expected
    # trained: the weights are not the initial ones (same seed, same init)
    from accelerate.utils import set_seed

    set_seed(0)
    initial = LongLlamaForCausalLM(LongLlamaConfig.from_json_file(ws.config))
    assert not torch.equal(initial.model.embed_tokens.weight, model.model.embed_tokens.weight)
    # and it runs (long input: memory path)
    with torch.no_grad():
        logits = model(torch.randint(4, model.config.vocab_size, (1, 40)), last_context_length=WINDOW).logits
    assert torch.isfinite(logits).all()

    log = read_log(run_a)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for record in log:
        assert math.isfinite(record["loss"]) and 0 < record["loss"] < 10
        assert record["tokens_per_s"] > 0
        assert record["lr"] == pytest.approx(3e-3)
        assert record["tokens_seen"] == record["step"] * 8 * WINDOW
    assert log[0]["loss"] == pytest.approx(math.log(len(TASK.tokenizer())), abs=0.3)  # starts near uniform
    assert log[-1]["loss"] < log[0]["loss"]
    # resumable checkpoints
    for step in (3, 6):
        checkpoint = run_a / "checkpoints" / f"step-{step}"
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["step"] == step and state["world_size"] == 1
        assert state["config"]["batch_size"] == 8 and state["config"]["cross_batch_range"] == 3
        data_state = json.loads((checkpoint / "data-rank0.json").read_text())
        assert data_state["stream"]["consumed"] > 0
    assert not list((run_a / "checkpoints").glob("*.partial"))


def test_loss_decreases(ws, tmp_path):
    output = tmp_path / "long"
    code, _, err = run(ws.args(output, "--steps", 30, "--log-every", 5))
    assert code == 0, err
    log = read_log(output)
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    losses = [r["loss"] for r in log]
    assert losses[-1] < losses[0] - 0.3, losses
    assert losses[-1] < math.log(len(TASK.tokenizer())) - 0.5, losses


def test_keep_checkpoints(ws, tmp_path):
    output = tmp_path / "keep"
    code, _, err = run(ws.args(output, "--steps", 4, "--save-every", 1, "--keep-checkpoints", 2, "--log-every", 4))
    assert code == 0, err
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-3", "step-4"]


# =========================================================================== exact resume


def test_exact_resume(run_a, run_b):
    output_b, out = run_b
    assert "Resumed from" in out and "step-3 at step 3" in out
    a = load_file(run_a / "model" / "model.safetensors")
    b = load_file(output_b / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the checkpoints match too (optimizer included), and hold safetensors and JSON only
    a6 = load_file(run_a / "checkpoints" / "step-6" / "optimizer.safetensors")
    b6 = load_file(output_b / "checkpoints" / "step-6" / "optimizer.safetensors")
    assert a6.keys() == b6.keys() and any(key.endswith(".exp_avg") for key in a6)
    for key in a6:
        assert torch.equal(a6[key], b6[key]), key
    for checkpoint in (run_a / "checkpoints" / "step-6", output_b / "checkpoints" / "step-3"):
        assert {p.suffix for p in checkpoint.iterdir()} == {".json", ".safetensors"}
    for step in (3, 6):
        data_a = (run_a / "checkpoints" / f"step-{step}" / "data-rank0.json").read_text()
        data_b = (output_b / "checkpoints" / f"step-{step}" / "data-rank0.json").read_text()
        assert json.loads(data_a) == json.loads(data_b)
    # the log continues from step 3: B logged 2, 3 (end of the first run), then 4 and 6
    log_a, log_b = {r["step"]: r for r in read_log(run_a)}, read_log(output_b)
    assert [r["step"] for r in log_b] == [2, 3, 4, 6]
    assert log_b[1]["loss"] == log_a[3]["loss"]
    # (rel 1e-6: the logged loss goes through a float32 all-reduce)
    assert log_b[0]["loss"] == pytest.approx((log_a[1]["loss"] + log_a[2]["loss"]) / 2, rel=1e-6)
    assert log_b[3]["loss"] == pytest.approx((log_a[5]["loss"] + log_a[6]["loss"]) / 2, rel=1e-6)
    assert log_b[3]["tokens_seen"] == log_a[6]["tokens_seen"] == 6 * 8 * WINDOW


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pt"])
def test_resume_refuses_a_planted_pickle(ws, run_a, tmp_path, capsys, planted):
    """A pickle planted in a checkpoint (what accelerate's load_state would have unpickled) is refused before anything
    is loaded, in one line; the payload never runs."""
    copy = tmp_path / "copy"
    shutil.copytree(run_a / "checkpoints", copy / "checkpoints")
    witness = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(witness), "w"))

    (copy / "checkpoints" / "step-6" / planted).write_bytes(pickle.dumps(Payload()))
    assert main(ws.args(copy, "--steps", 8, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert f"{planted} is a pickle file" in err and err.count("\n") == 1, err
    assert not witness.exists() and not (copy / "model").exists()


def test_resume_refuses_an_old_accelerate_checkpoint(ws, run_a, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_a / "checkpoints", copy / "checkpoints")
    state_file = copy / "checkpoints" / "step-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["format"]
    state_file.write_text(json.dumps(state))
    assert main(ws.args(copy, "--steps", 8, "--resume", "auto")) == 2
    assert "older longllama-train" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated_model", "missing_rng"])
def test_resume_from_a_damaged_checkpoint_is_one_line(ws, run_a, tmp_path, capsys, damage):
    copy = tmp_path / "copy"
    shutil.copytree(run_a / "checkpoints", copy / "checkpoints")
    checkpoint = copy / "checkpoints" / "step-6"
    if damage == "truncated_model":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (checkpoint / "rng-rank0.safetensors").unlink()
    assert main(ws.args(copy, "--steps", 8, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "step-6" in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_resume_checkpoint_engines():
    from accelerate.utils import DistributedType

    from longllama.checkpoint import check_engine, whole_state

    assert whole_state(DistributedType.NO) and whole_state(DistributedType.MULTI_CPU)
    for engine in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        assert not whole_state(engine)
        with pytest.raises(ValueError, match="--save-every 0"):
            check_engine(engine)


def test_resumed_log_window_loss(run_a, run_b):
    output_b, _ = run_b
    log_a, log_b = {r["step"]: r for r in read_log(run_a)}, {r["step"]: r for r in read_log(output_b)}
    assert log_b[4]["loss"] == pytest.approx(log_a[4]["loss"], rel=1e-6)


def test_resume_with_a_different_setup_is_refused(ws, run_a, tmp_path, capsys):
    checkpoint = run_a / "checkpoints" / "step-3"
    other_data = tmp_path / "other.jsonl"
    shutil.copy(ws.data, other_data)
    cases = [
        (["--batch-size", 4], "batch_size"),
        (["--cross-batch-range", 2], "cross_batch_range"),
        (["--pack-size", 4], "pack_size"),
        (["--seed", 1], "seed"),
        (["--mode", "memory"], "mode"),
    ]
    for n, (extra, key) in enumerate(cases):
        output = tmp_path / f"out{n}"
        code = main(ws.args(output, "--steps", 6, "--resume", checkpoint, *extra))
        err = capsys.readouterr().err
        assert code == 2, extra
        assert "Cannot resume" in err and f"{key}: saved" in err, err
        assert_not_trained(output)
    output = tmp_path / "data"
    assert main(ws.args(output, "--steps", 6, "--resume", checkpoint, data=other_data)) == 2
    assert "data: saved" in capsys.readouterr().err
    assert_not_trained(output)
    # --resume auto picks the latest checkpoint of output_dir
    copy = tmp_path / "copy"
    shutil.copytree(run_a / "checkpoints", copy / "checkpoints")
    assert main(ws.args(copy, "--steps", 8, "--resume", "auto", "--batch-size", 4)) == 2
    err = capsys.readouterr().err
    assert "step-6" in err and "batch_size" in err
    assert not (copy / "model").exists()
    # not a checkpoint
    assert main(ws.args(tmp_path / "x", "--steps", 6, "--resume", ws.root)) == 2
    assert "not a longllama-train checkpoint" in capsys.readouterr().err
    assert set(RESUME_KEYS) >= {"batch_size", "cross_batch_range", "pack_size", "data", "seed", "mode", "window"}


# =========================================================================== bad input


def _bad_setup(ws, tmp_path, name):
    """(argv, expected message) of one bad run."""
    output = tmp_path / "out"
    if name == "empty data":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        return ws.args(output, "--steps", 2, data=empty), f"Data file {empty} is empty"
    if name == "missing data":
        missing = tmp_path / "missing.jsonl"
        return ws.args(output, "--steps", 2, data=missing), f"Data file {missing} does not exist"
    if name == "data too small":
        small = tmp_path / "small.jsonl"
        small.write_text(json.dumps({"text": "k1 k2 = v1 ;"}) + "\n")
        return ws.args(output, "--steps", 2, data=small), "fewer than one batch pack needs"
    if name == "cross batch range":
        return ws.args(output, "--steps", 2, "--cross-batch-range", 8), "cross_batch_range=8 needs more rows"
    if name == "pack size":
        return ws.args(output, "--steps", 2, "--pack-size", 3), "must be a multiple of pack_size=3"
    if name == "window":
        return ws.args(output, "--steps", 2, "--window", 32), "longer than the model's window"
    if name == "no memory layers":
        config = write_model_config(tmp_path / "nomem.json", TASK.tokenizer(), mem_layers=[])
        argv = ws.args(output, "--steps", 2)
        argv[argv.index(str(ws.config))] = str(config)
        return argv, "no memory layers"
    if name == "model and init-config":
        return ws.args(output, "--steps", 2, "--model", ws.root), "exactly one of --model"
    if name == "neither model nor init-config":
        argv = ws.args(output, "--steps", 2)
        del argv[:2]
        return argv, "exactly one of --model"
    if name == "mode":
        return ws.args(output, "--steps", 2, "--mode", "bogus"), "--mode 'bogus'"
    if name == "no data":
        argv = ws.args(output, "--steps", 2)
        del argv[4:6]
        return argv, "--data"
    if name == "not a model":
        argv = ws.args(output, "--steps", 2)
        del argv[:2]
        return argv + ["--model", str(tmp_path)], "not a model directory"
    if name == "steps":
        return ws.args(output, "--steps", 0), "--steps must be at least 1"
    if name == "scheduled cross batch range":
        return ws.args(output, "--steps", 2, "--cross-batch-schedule", "1:8"), "cross_batch_range=8 needs more rows"
    if name == "cross batch schedule":
        return ws.args(output, "--steps", 2, "--cross-batch-schedule", "1-3"), "expected STEP:D pairs"
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "empty data", "missing data", "data too small", "cross batch range", "pack size", "window", "no memory layers",
    "model and init-config", "neither model nor init-config", "mode", "no data", "not a model", "steps",
    "scheduled cross batch range", "cross batch schedule",
])
def test_bad_input_is_a_clear_error(ws, tmp_path, capsys, name):
    argv, message = _bad_setup(ws, tmp_path, name)
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("longllama-train: error:")]
    assert len(errors) == 1, err
    assert message in errors[0], err
    assert "Traceback" not in err
    assert_not_trained(tmp_path / "out")


def test_empty_mem_layers_config():
    """LongLlamaConfig accepts mem_layers=[] (a plain Llama); training refuses it (above), and so does the
    evaluation."""
    config = tiny_config(mem_layers=[])
    assert config.mem_layers == []
    model = LongLlamaForCausalLM(config).eval()
    docs = [list(range(3, 19)), list(range(20, 36))]
    with pytest.raises(ValueError, match="no memory layers"):
        positive_attention_mass(model, docs, 1)



def test_span_attention_mass_is_the_share_of_the_last_query():
    """With zero key projections every score is 0, so the last query's attention is uniform over the whole prompt
    (memory and final window): the mass of a span is its share of the tokens. With trained-like random weights the
    masses of a partition of the prompt add up to 1 (memory first, then the final window)."""
    window, tokens = 8, 37
    ids = list(range(3, 3 + tokens))
    model = tiny_model(seed=4, max_position_embeddings=window, mem_layers=[1, 2])  # last_context_length 4
    for final in (4, window):
        spans = ((0, 10), (10, tokens - final), (tokens - final, tokens))
        masses = [span_attention_mass(model, ids, span, last_context_length=final) for span in spans]
        assert abs(sum(masses) - 1) < 1e-5 and all(0 < m < 1 for m in masses)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.zero_()
    for span in ((0, 1), (5, 20), (30, 37), (0, 37)):
        assert abs(span_attention_mass(model, ids, span) - (span[1] - span[0]) / tokens) < 1e-6
    for bad, message in (((5, 5), "non-empty"), ((0, 38), "non-empty"), ((-1, 3), "non-empty")):
        with pytest.raises(ValueError, match=message):
            span_attention_mass(model, ids, bad)
    with pytest.raises(ValueError, match="no memory"):
        span_attention_mass(model, ids[:4], (0, 2))


def test_cross_batch_schedule_parsing():
    cfg = TrainConfig(init_config=__file__, data=["x"], cross_batch_range=1, cross_batch_schedule="10:3, 20:7")
    schedule = cross_batch_schedule(cfg)
    assert schedule == [(10, 3), (20, 7)]
    assert [cross_batch_range_at(cfg, schedule, s) for s in (0, 9, 10, 19, 20, 1000)] == [1, 1, 3, 3, 7, 7]
    assert cross_batch_range_at(cfg, [], 50) == 1
    for bad, message in (("10:3,10:7", "steps must increase"), ("5:-1", "at least 0"), ("x", "STEP:D"),
                         ("1:2:3", "STEP:D")):
        with pytest.raises(ValueError, match=message):
            check_config(dataclasses.replace(cfg, cross_batch_schedule=bad))
    with pytest.raises(ValueError, match="--mode fot"):
        check_config(dataclasses.replace(cfg, mode="memory"))
    check_config(dataclasses.replace(cfg, mode="memory", memory_negatives=True))  # memory mode with negatives
    with pytest.raises(ValueError, match="--mode fot has negatives already"):
        check_config(dataclasses.replace(cfg, memory_negatives=True))


def test_packed_batches_new_cross_batch_range_keeps_the_data():
    tokenizer = TASK.tokenizer()
    rng = random.Random(0)
    docs = [TASK.document(rng)["text"] for _ in range(20)]

    def batches(d):
        return PackedBatches(TokenStream(DocumentSource(documents=docs), tokenizer), 8, WINDOW, 2, d)

    changed, fresh, plain = batches(1), batches(3), batches(1)
    first = next(changed)
    assert torch.equal(first["cross_batch_rows"], next(plain)["cross_batch_rows"])
    changed.set_cross_batch_range(3)
    second, reference = next(changed), next(plain)
    next(fresh)
    assert torch.equal(second["input_ids"], reference["input_ids"])  # same documents, same rows
    assert torch.equal(second["cross_batch_rows"], next(fresh)["cross_batch_rows"])  # d = 3's rows
    assert not torch.equal(second["cross_batch_rows"], reference["cross_batch_rows"])
    with pytest.raises(ValueError, match="needs more rows"):
        changed.set_cross_batch_range(8)


def test_cross_batch_schedule_run(ws, tmp_path):
    """d = 0 for two steps, then 3: the first two steps are those of a d = 0 run; the log records d."""
    scheduled, plain = tmp_path / "scheduled", tmp_path / "plain"
    code, _, err = run(ws.args(scheduled, "--steps", 4, "--log-every", 1, "--cross-batch-range", 0,
                               "--cross-batch-schedule", "2:3"))
    assert code == 0, err
    code, _, err = run(ws.args(plain, "--steps", 2, "--log-every", 1, "--cross-batch-range", 0))
    assert code == 0, err
    log = read_log(scheduled)
    assert [r["cross_batch_range"] for r in log] == [0, 0, 3, 3]
    assert [r["loss"] for r in log[:2]] == pytest.approx([r["loss"] for r in read_log(plain)], abs=1e-6)


def test_sentencepiece_tokenizer_directory(ws, tmp_path):
    """A saved `LongLlamaTokenizer` (sentencepiece tokenizer.model) is read as such: no trust_remote_code prompt,
    sentencepiece's own ids, and the final checkpoint carries it."""
    import io

    import sentencepiece as spm

    from longllama.data import load_tokenizer
    from longllama.modeling import LongLlamaTokenizer

    rng = random.Random(0)
    texts = [TASK.document(rng)["text"] for _ in range(200)]
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=writer, vocab_size=60, model_type="bpe", bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    (tmp_path / "spm.model").write_bytes(writer.getvalue())
    tokenizer = LongLlamaTokenizer(vocab_file=str(tmp_path / "spm.model"))
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is LongLlamaTokenizer and loaded(texts[0])["input_ids"] == tokenizer(texts[0])["input_ids"]
    config = write_model_config(tmp_path / "config.json", tokenizer)
    argv = ws.args(tmp_path / "out", "--steps", 2, "--tokenizer", tmp_path / "tok")
    argv[argv.index(str(ws.config))] = str(config)
    code, _, err = run(argv)
    assert code == 0, err
    assert (tmp_path / "out" / "model" / "tokenizer.model").is_file()
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_check_config_needs_no_files():
    with pytest.raises(ValueError, match="--lr-schedule"):
        check_config(TrainConfig(init_config=__file__, data=["x"], lr_schedule="linear"))
    with pytest.raises(ValueError, match="--mixed-precision"):
        check_config(TrainConfig(init_config=__file__, data=["x"], mixed_precision="fp8"))
    with pytest.raises(ValueError, match="--grad-accum"):
        check_config(TrainConfig(init_config=__file__, data=["x"], grad_accum=0))
    check_config(TrainConfig(init_config=__file__, data=["x"]))


# =========================================================================== options


def test_gradient_checkpointing_same_losses(ws, run_a, tmp_path):
    output = tmp_path / "gc"
    code, _, err = run(ws.args(output, "--steps", 2, "--log-every", 1, "--gradient-checkpointing"))
    assert code == 0, err
    plain, checkpointed = read_log(run_a), read_log(output)
    assert checkpointed[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)  # same forward
    assert checkpointed[1]["loss"] == pytest.approx(plain[1]["loss"], abs=1e-5)  # same gradients, same update


def test_grad_accum_consumes_micro_batches(ws, run_a, tmp_path):
    """3 optimizer steps of 2 micro-batches read exactly the data of 6 plain steps."""
    output = tmp_path / "accum"
    code, _, err = run(ws.args(output, "--steps", 3, "--grad-accum", 2, "--log-every", 3))
    assert code == 0, err
    (record,) = read_log(output)
    assert record["step"] == 3 and record["tokens_seen"] == 6 * 8 * WINDOW and math.isfinite(record["loss"])
    accumulated = json.loads((output / "checkpoints" / "step-3" / "data-rank0.json").read_text())
    plain = json.loads((run_a / "checkpoints" / "step-6" / "data-rank0.json").read_text())
    assert accumulated == plain


def test_eval_every_logs_positive_attention_mass(ws, tmp_path):
    output = tmp_path / "eval"
    code, _, err = run(ws.args(output, "--steps", 3, "--log-every", 1, "--eval-every", 2, "--eval-documents", 4,
                               "--eval-distractors", 2))
    assert code == 0, err
    log = read_log(output)
    assert [("positive_attention_mass" in r) for r in log] == [False, True, True]  # step 2 and the last step
    for record in log[1:]:
        assert 0 < record["positive_attention_mass"] < 1
        assert 0 < record["memory_positive_share"] < 1
        assert record["positive_attention_mass"] > record["memory_positive_share"] * 0.5


def test_evaluate_prints_json(ws, run_a, tmp_path, capsys):
    code = main(["--evaluate", str(run_a / "model"), "--data", str(ws.data), "--eval-distractors", "3",
                 "--eval-documents", "4", "--output-dir", str(tmp_path / "unused")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["distractors"] == 3
    assert 0 < result["positive"] < 1 and 0 < result["memory_positive"] < 1
    assert not (tmp_path / "unused").exists()
    # 0 distractors: all attention is on the document itself
    assert main(["--evaluate", str(run_a / "model"), "--data", str(ws.data), "--eval-distractors", "0",
                 "--eval-documents", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["positive"] == pytest.approx(1.0) and result["memory_positive"] == pytest.approx(1.0)
    # a directory without config.json
    assert main(["--evaluate", str(tmp_path), "--data", str(ws.data)]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_memory_mode_runs(ws, tmp_path):
    output = tmp_path / "memory"
    code, _, err = run(ws.args(output, "--steps", 3, "--log-every", 1, "--mode", "memory", "--pack-size", 4))
    assert code == 0, err
    log = read_log(output)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)
    # one 32-token document per pack of 4 x 16 tokens: half of every pack is padding, not counted
    assert log[-1]["tokens_seen"] == 3 * 2 * 32
    data_state = json.loads((output / "checkpoints" / "step-3" / "data-rank0.json").read_text())
    assert data_state["stream"]["consumed"] == 3 * 2 and "rng" in data_state
    assert (output / "model" / "model.safetensors").is_file()


def test_memory_mode_with_negatives_runs(ws, tmp_path):
    """--mode memory --memory-negatives: the same examples and padding as plain memory mode. With d = 1 =
    pack_size - 1 a row sees only its own example's earlier row (the stepping rule), so the first step is plain
    memory mode's; from step 2 (d = 3) rows also see other examples, and the loss differs."""
    plain, negatives = tmp_path / "plain", tmp_path / "negatives"
    code, _, err = run(ws.args(plain, "--steps", 2, "--log-every", 1, "--mode", "memory", "--pack-size", 2))
    assert code == 0, err
    code, _, err = run(ws.args(negatives, "--steps", 2, "--log-every", 1, "--mode", "memory", "--pack-size", 2,
                               "--memory-negatives", "--cross-batch-range", 1, "--cross-batch-schedule", "1:3"))
    assert code == 0, err
    log = read_log(negatives)
    assert [r["cross_batch_range"] for r in log] == [1, 3]
    assert [r["tokens_seen"] for r in log] == [r["tokens_seen"] for r in read_log(plain)]  # the same examples
    assert log[0]["loss"] == pytest.approx(read_log(plain)[0]["loss"], abs=1e-6)
    assert log[1]["loss"] != pytest.approx(read_log(plain)[1]["loss"], abs=1e-6)  # other examples in memory
    assert json.loads((negatives / "checkpoints" / "step-2" / "data-rank0.json").read_text()) == json.loads(
        (plain / "checkpoints" / "step-2" / "data-rank0.json").read_text())
    code, _, err = run(ws.args(tmp_path / "bad", "--steps", 1, "--mode", "memory", "--pack-size", 4,
                               "--memory-negatives", "--cross-batch-range", 2))
    assert code == 2 and "at least pack_size - 1 = 3" in err


# =========================================================================== DDP


def _launch_env(tmp_path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"),
                TOKENIZERS_PARALLELISM="false")


@pytest.mark.parametrize("launcher", ["multi_gpu", "cpu_mpirun"])
def test_ddp_two_cpu_processes(ws, tmp_path, launcher):
    """Real DDP on 2 CPU processes, no `accelerate config` file (HF_HOME is empty), launched with
    `accelerate launch --multi_gpu --num_processes 2` (torchrun; the trainer asks accelerate for CPU when there is no
    GPU) or `accelerate launch --cpu --num_processes 2 --mpirun_hostfile hosts` (MPI; without the hostfile
    accelerate's `--cpu` launcher starts ONE process)."""
    output = tmp_path / "ddp"
    env = _launch_env(tmp_path)
    env.pop("ACCELERATE_USE_CPU", None)
    if launcher == "multi_gpu":
        flags = ["--multi_gpu", "--main_process_port", str(29500 + os.getpid() % 1000)]
    else:
        if shutil.which("mpirun") is None:
            pytest.skip("needs mpirun: pip install mpich (in the test extra on Linux x86-64)")
        hosts = tmp_path / "hosts"
        hosts.write_text("localhost\n")
        flags = ["--cpu", "--mpirun_hostfile", str(hosts)]
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "longllama.train",
               *ws.args(output, "--steps", 4, "--log-every", 2, "--batch-size", 4, "--save-every", 2)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "hf-home" / "accelerate").exists()
    for step in (2, 4):
        checkpoint = output / "checkpoints" / f"step-{step}"
        assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
        ranks = [json.loads((checkpoint / f"data-rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0] != ranks[1]  # each process has its own documents
        assert all(r["stream"]["consumed"] > 0 for r in ranks)
    log = read_log(output)
    assert [r["step"] for r in log] == [2, 4]  # one process writes the log
    assert log[-1]["tokens_seen"] == 4 * 2 * 4 * WINDOW  # tokens of both processes
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(output / "model")) is LongLlamaForCausalLM


@pytest.mark.slow
def test_ddp_resume_is_exact(ws, tmp_path):
    """DDP on 2 CPU processes, interrupted after 2 steps and resumed to 4, ends with the model of an uninterrupted
    4-step run: every process restores its own RNG and data position from safetensors and JSON."""
    env = _launch_env(tmp_path)
    env.pop("ACCELERATE_USE_CPU", None)

    def launch(output, steps, *extra):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--main_process_port",
                   str(29600 + os.getpid() % 1000), "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                   "no", "--dynamo_backend", "no", "-m", "longllama.train",
                   *ws.args(output, "--steps", steps, "--log-every", 2, "--batch-size", 4, "--save-every", 2, *extra)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=500)
        assert result.returncode == 0, result.stderr[-3000:]

    launch(tmp_path / "whole", 4)
    launch(tmp_path / "resumed", 2)
    launch(tmp_path / "resumed", 4, "--resume", "auto")
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-2"
    assert {p.name for p in checkpoint.glob("rng-rank*")} == {f"rng-rank{r}.{s}" for r in (0, 1)
                                                               for s in ("json", "safetensors")}
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# =========================================================================== positive attention mass


def _documents(count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 99, (length,), generator=g).tolist() for _ in range(count)]


@pytest.mark.parametrize("own_windows", [1, 2])
def test_positive_attention_mass_random_model(own_windows):
    """A default-init model attends almost uniformly: the memory share on the document's own windows is
    own / (own + d); with 0 distractors everything is positive."""
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(tiny_config(last_context_length=8)).eval()
    docs = _documents(5, 8 * (own_windows + 1))
    previous = None
    for d in (0, 1, 3, 6):
        mass = positive_attention_mass(model, docs, d)
        assert 0 < mass["positive"] <= 1 and 0 < mass["memory_positive"] <= 1
        if d == 0:
            assert mass["positive"] == pytest.approx(1.0, abs=1e-5)
            assert mass["memory_positive"] == pytest.approx(1.0, abs=1e-5)
        else:
            assert mass["memory_positive"] == pytest.approx(own_windows / (own_windows + d), abs=0.05)
            assert mass["positive"] >= mass["memory_positive"]  # the local window counts as positive
            assert mass["positive"] < previous["positive"] and mass["memory_positive"] < previous["memory_positive"]
        previous = mass
    assert not model.training


def test_positive_attention_mass_sharp_model_and_training_flag():
    """The same bounds and ordering for a model with large weights (far from uniform attention); the model's
    training flag is restored."""
    model = tiny_model(seed=1).train()
    docs = _documents(4, 16, seed=1)
    masses = [positive_attention_mass(model, docs, d)["memory_positive"] for d in (0, 2, 8)]
    assert model.training
    assert masses[0] == pytest.approx(1.0, abs=1e-5)
    assert 1 > masses[1] > masses[2] > 0
    assert masses[2] < 0.5


def test_positive_attention_mass_at_chosen_queries():
    """`positions` averages over the chosen queries only: all of the last window's is the default, one query at a
    time averages back to it (every document has the same number of valid queries), and positions outside the last
    whole window are refused."""
    model = tiny_model(seed=2).eval()
    window = model.config.max_position_embeddings
    docs = _documents(3, 2 * window + 3, seed=2)  # 3 trailing tokens: the last whole window is the second
    last = list(range(window, 2 * window))
    everything = positive_attention_mass(model, docs, 2)
    assert positive_attention_mass(model, docs, 2, positions=[last] * 3) == pytest.approx(everything, abs=1e-6)
    singles = [positive_attention_mass(model, docs, 2, positions=[[p]] * 3) for p in last]
    for key in everything:
        assert sum(m[key] for m in singles) / window == pytest.approx(everything[key], abs=1e-5)
        assert max(m[key] for m in singles) > min(m[key] for m in singles)  # the choice of query matters
    for bad in ([window - 1], [2 * window], []):
        with pytest.raises(ValueError, match="last whole window"):
            positive_attention_mass(model, docs, 2, positions=[bad] * 3)


def test_distraction_prompt_and_errors():
    doc, other = list(range(10, 30)), list(range(40, 52))
    prompt, own_memory = distraction_prompt(doc, [other, other[2:]], 8)
    assert prompt == other[:8] + other[2:10] + doc[:16] and own_memory == 8
    with pytest.raises(ValueError, match="shorter than two windows"):
        distraction_prompt(doc[:15], [other], 8)
    with pytest.raises(ValueError, match="shorter than one window"):
        distraction_prompt(doc, [other[:7]], 8)


def test_memory_bank_run_resumes_exactly(ws, run_a, tmp_path):
    """--memory-bank: from step 2 rows also retrieve from the keys of earlier batches (the loss differs from the plain
    run's); the bank is saved with each checkpoint (safetensors), so a resumed run ends with the same weights."""
    flags = ("--memory-bank", 4, "--memory-bank-top-k", 2, "--log-every", 1)
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    code, _, err = run(ws.args(whole, "--steps", 4, *flags))
    assert code == 0, err
    log, plain = read_log(whole), read_log(run_a)
    assert log[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)  # the bank is empty at the first step
    assert log[1]["loss"] != pytest.approx(plain[1]["loss"], abs=1e-4)
    assert load_file(whole / "checkpoints" / "step-4" / "bank-rank0.safetensors")["layer1.keys"].shape[1] == 4 * WINDOW
    code, _, err = run(ws.args(pieces, "--steps", 2, *flags))
    assert code == 0, err
    code, out, err = run(ws.args(pieces, "--steps", 4, "--resume", "auto", *flags))
    assert code == 0 and "Resumed from" in out, err
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(pieces / "model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # resuming needs the same bank, and a bank needs negatives
    code, _, err = run(ws.args(pieces, "--steps", 5, "--resume", "auto", "--memory-bank", 8))
    assert code == 2 and "memory_bank: saved 4, now 8" in err
    code, _, err = run(ws.args(tmp_path / "bad", "--steps", 1, "--memory-bank", 4, "--positives-only"))
    assert code == 2 and "--memory-bank adds other documents' keys to memory: it needs negatives" in err
    code, _, err = run(ws.args(tmp_path / "bad", "--steps", 1, "--memory-bank", 4, "--memory-bank-top-k", 0))
    assert code == 2 and "--memory-bank-top-k at least 1" in err
    assert_not_trained(tmp_path / "bad")


def test_resume_with_a_damaged_memory_bank_is_one_line(ws, tmp_path, capsys):
    output = tmp_path / "bank"
    code, _, err = run(ws.args(output, "--steps", 2, "--memory-bank", 4))
    assert code == 0, err
    bank_file = output / "checkpoints" / "step-2" / "bank-rank0.safetensors"
    for damage in (b"not a safetensors file", None):
        if damage is None:
            bank_file.unlink()
        else:
            bank_file.write_bytes(damage)
        code, _, err = run(ws.args(output, "--steps", 3, "--memory-bank", 4, "--resume", "auto"))
        assert code == 2 and "has no whole bank-rank0.safetensors" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
