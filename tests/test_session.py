"""Saved and live sessions belong to one model (issue 18): the model identity (`longllama.identity`), the cache's
binding to its model, atomic saves into directories that hold other files, and hostile session files."""

import copy
import os
import threading
import time

import pytest
import torch
from conftest import tiny_model

from longllama import LongLlamaCache, identity, session
from longllama.modeling import cache_longllama

W, L = 8, 4  # tiny_config: window 8, last_context_length 4


def ids(tokens: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 99, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def fill(model, tokens: int = L + 3 * W, seed: int = 0, cache=None):
    with torch.no_grad():
        return model(ids(tokens, seed), use_cache=True, cache=cache).cache


def ask(model, cache, seed: int = 9):
    with torch.no_grad():
        return model(ids(5, seed), use_cache=True, cache=cache).logits


@pytest.fixture
def pair():
    """A model with memory in layers 1 and 2, and an exact copy of it (another object, the same identity)."""
    model = tiny_model(1, mem_layers=[1, 2])
    return model, copy.deepcopy(model)


# --------------------------------------------------------------------------------------------------------------------
# the attacks of the issue: same configuration, other weights that shape the memory
# --------------------------------------------------------------------------------------------------------------------


def other_mlp_below_memory(model):
    model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    return "weights of layer 0 differ"


def other_embeddings(model):
    model.model.embed_tokens.weight.add_(0.01)
    return "embeddings differ"


def reversed_key_rows(model):
    k_proj = model.model.layers[1].self_attn.k_proj.weight
    k_proj.copy_(k_proj.flip(0))  # the same absolute sum, which the old fingerprint compared
    return "weights of layer 1 differ"


def other_layer_above_memory(model):
    model.model.layers[3].self_attn.v_proj.weight.mul_(-1)  # its local context is part of the session too
    return "weights of layer 3 differ"


ATTACKS = [other_mlp_below_memory, other_embeddings, reversed_key_rows, other_layer_above_memory]


@pytest.mark.parametrize("attack", ATTACKS)
def test_saved_session_refuses_a_model_with_other_weights(tmp_path, pair, attack):
    model, other = pair
    fill(model).save(tmp_path / "session")
    with torch.no_grad():
        difference = attack(other)
    with pytest.raises(ValueError, match=f"saved from another model \\({difference}\\)"):
        LongLlamaCache.load(tmp_path / "session", other)
    LongLlamaCache.load(tmp_path / "session", model)  # its own model still loads it


@pytest.mark.parametrize("attack", ATTACKS)
def test_live_cache_refuses_another_model(pair, attack):
    model, other = pair
    cache = fill(model)
    with torch.no_grad():
        difference = attack(other)
    with pytest.raises(ValueError, match=f"filled by another model \\({difference}\\)"):
        ask(other, cache)
    with pytest.raises(ValueError, match=f"filled by another model \\({difference}\\)"):
        cache.save("unused", model=other)
    ask(model, cache)  # its own model continues it


def test_a_copy_of_the_model_continues_a_live_or_loaded_session(tmp_path, pair):
    """Another object with the same weights, dtype and configuration may continue a session, live or saved."""
    model, twin = pair
    cache, reference = fill(model), fill(model)
    expected = ask(model, reference)
    assert torch.equal(ask(twin, cache), expected)
    fill(model).save(tmp_path / "session")
    assert torch.equal(ask(twin, LongLlamaCache.load(tmp_path / "session", model)), expected)


def test_an_empty_or_reset_cache_changes_hands(pair):
    model = pair[0]
    stranger = tiny_model(5, mem_layers=[1, 2])
    cache = LongLlamaCache(model.config)
    ask(stranger, cache)
    cache.reset()
    fill(model, cache=cache)  # a reset cache is empty: whoever fills it owns it
    with pytest.raises(ValueError, match="filled by another model"):
        ask(stranger, cache)


def test_without_the_package_only_the_filling_model_continues(monkeypatch, pair):
    model, twin = pair
    cache = fill(model)
    monkeypatch.setattr(cache_longllama, "SESSION_STORE", None)
    ask(model, cache)
    with pytest.raises(ValueError, match="filled by another model"):
        ask(twin, cache)


def test_session_of_a_dead_model_cannot_be_continued_by_another():
    model = tiny_model(1, mem_layers=[1, 2])
    cache = fill(model)
    twin = copy.deepcopy(model)
    del model
    with pytest.raises(ValueError, match="whose model no longer exists"):
        ask(twin, cache)


def test_fp32_session_into_a_bf16_model_names_the_dtype(tmp_path, pair):
    """Local contexts are kept in the compute dtype: a bf16 model does not compute what the fp32 one stored. Refused
    (converting would give a session the bf16 model never computed), naming the dtypes."""
    model = pair[0]
    fill(model).save(tmp_path / "session")
    with pytest.raises(ValueError, match="dtype: saved float32, this model bfloat16"):
        LongLlamaCache.load(tmp_path / "session", copy.deepcopy(model).to(torch.bfloat16))


# --------------------------------------------------------------------------------------------------------------------
# the identity is computed once per model and follows in-place changes
# --------------------------------------------------------------------------------------------------------------------


def test_identity_is_hashed_once_and_again_after_a_change(monkeypatch, pair):
    model = pair[0]
    calls = []
    original = identity._hash_module
    monkeypatch.setattr(identity, "_hash_module", lambda module: calls.append(module) or original(module))
    first = identity.model_identity(model)
    assert len(calls) == 5  # embeddings and 4 layers
    assert identity.model_identity(model) is first and identity.model_identity(model.model) is first
    assert len(calls) == 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(ids(6), labels=ids(6)).loss.backward()
    optimizer.step()  # in place: the version counters move
    changed = identity.model_identity(model)
    assert len(calls) == 10 and changed["parts"] != first["parts"]
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.data.mul_(2)  # through .data: invisible to the counters
    assert identity.model_identity(model) is changed
    identity.forget_identity(model)
    assert identity.model_identity(model)["parts"]["layer 2"] != changed["parts"]["layer 2"]


def test_identity_of_a_disk_offloaded_model(tmp_path):
    """Weights accelerate offloads to disk (meta parameters) are hashed from the offloaded copy."""
    pytest.importorskip("accelerate")
    from longllama import LongLlamaForCausalLM

    model = tiny_model(1, mem_layers=[1, 2])
    model.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(4)}, **{"model.layers.2": "disk"})
    offloaded = LongLlamaForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                     offload_folder=tmp_path / "offload")
    assert identity.model_identity(offloaded) == identity.model_identity(model)


def test_concurrent_threads_share_one_identity(pair):
    model = pair[0]
    results = []
    threads = [threading.Thread(target=lambda: results.append(identity.model_identity(model))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r == results[0] for r in results)


# --------------------------------------------------------------------------------------------------------------------
# saving: one rename, nothing lost, nothing left
# --------------------------------------------------------------------------------------------------------------------


def test_save_into_an_existing_empty_directory(tmp_path, pair):
    model = pair[0]
    (tmp_path / "empty").mkdir()
    fill(model).save(tmp_path / "empty")
    assert LongLlamaCache.load(tmp_path / "empty", model).get_seq_length() == L + 3 * W


def test_a_failed_save_keeps_the_previous_session_and_leaves_nothing(tmp_path, monkeypatch, pair):
    model = pair[0]
    fill(model).save(tmp_path / "s")
    before = sorted(os.listdir(tmp_path / "s"))

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session, "atomic_write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fill(model, seed=3).save(tmp_path / "s")
    assert sorted(os.listdir(tmp_path / "s")) == before
    assert LongLlamaCache.load(tmp_path / "s", model).get_seq_length() == L + 3 * W


def test_the_next_save_removes_what_a_killed_save_left(tmp_path, pair):
    """Leftovers of killed saves (a partial tensors file, an unreferenced tensors file, a temporary session.json, a
    partial directory beside a new session's path) go at the next save; the user's files stay."""
    model = pair[0]
    directory = tmp_path / "s"
    fill(model).save(directory)
    leftovers = [".memory.0123abcd.partial", "memory.0123456789abcdef.safetensors", ".session.json.k2j3_x.tmp"]
    for name in leftovers[1:]:
        (directory / name).write_bytes(b"x" * 10)
    (directory / leftovers[0]).mkdir()  # the partial directory the tensors file is written in
    (directory / leftovers[0] / ".tmpAbC123").write_bytes(b"x" * 10)  # safetensors' own temporary file
    (directory / "memory.notes.safetensors").write_bytes(b"mine")  # not one of ours: the name does not match
    fill(model, seed=4).save(directory)
    names = set(os.listdir(directory))
    assert not names & set(leftovers) and "memory.notes.safetensors" in names and len(names) == 3
    stale = tmp_path / ".fresh.partial-abc123"
    stale.mkdir()
    (stale / "memory.0123456789abcdef.safetensors").write_bytes(b"x")
    fill(model).save(tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["fresh", "s"]


def test_version_1_session_is_refused_and_replaced(tmp_path, pair):
    model = pair[0]
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "memory.safetensors").write_bytes(b"old tensors")
    (directory / "session.json").write_text('{"format": "longllama-session", "version": 1}')
    with pytest.raises(ValueError, match="format version 1; this LongLLaMA reads version 2"):
        LongLlamaCache.load(directory, model)
    fill(model).save(directory)
    assert len(os.listdir(directory)) == 2 and not (directory / "memory.safetensors").exists()


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "/etc/hostname"])
def test_session_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path, pair, target):
    """`session.json` linked to a device or a FIFO never blocks the loader; one linked to a regular file elsewhere is
    read (it is a file the user chose) and refused as not a session."""
    model = pair[0]
    directory = tmp_path / "s"
    fill(model).save(directory)
    (directory / "session.json").unlink()
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
        target = tmp_path / "fifo"
    if not os.path.exists(target):
        pytest.skip(f"{target} does not exist here")
    (directory / "session.json").symlink_to(target)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not a regular file|corrupted|not a LongLLaMA session file"):
        LongLlamaCache.load(directory, model)
    with pytest.raises(FileExistsError, match="not a readable LongLLaMA session"):
        fill(model).save(directory)
    assert time.perf_counter() - start < 10


def test_tensors_file_named_outside_the_directory_is_refused(tmp_path, pair):
    import json

    model = pair[0]
    directory = tmp_path / "s"
    fill(model).save(directory)
    data = json.loads((directory / "session.json").read_text())
    for name in ("../memory.0123456789abcdef.safetensors", "/etc/passwd", 7):
        data["tensors"] = name
        (directory / "session.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match="names no valid tensors file"):
            LongLlamaCache.load(directory, model)
