"""Memory at scale (docs/inference.md#beyond, docs/memory.md, issue 6): kNN top-k retrieval, bounded memory, int8
storage, offload, saved sessions, beam search sharing one memory, device maps."""

import copy
import hashlib
import json
import os

import pytest
import torch
from conftest import max_err, tiny_model
from huggingface_hub.errors import StrictDataclassError
from reference import RefConfig, reference_forward

from longllama import LongLlamaCache, LongLlamaForCausalLM
from longllama import hnsw
from longllama.modeling import memory_longllama
from longllama.modeling.attention_longllama import blockwise_memory_attention_forward, topk_memory_attention_forward
from longllama.modeling.cache_longllama import MemoryCacheLayer
from longllama.modeling.memory_longllama import LayerMemory

W, L = 8, 4  # tiny_config: window 8, last_context_length 4
ATOL = 1e-4


def random_ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 99, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, ids, **kwargs):
    state_dict = {k: v.double() for k, v in model.state_dict().items()}
    return reference_forward(state_dict, RefConfig.from_hf(model.config), ids, **kwargs)[0]


def run(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=True, **kwargs)


def memory_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, MemoryCacheLayer)]


# --------------------------------------------------------------------------------------------------------------------
# kNN top-k
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_top_k_forward_matches_reference(top_k, kv_heads):
    """Windowed forward with top-k retrieval (two memory layers, GQA) against the naive float64 reference, which
    scores all of memory and keeps each query's k best keys."""
    model = tiny_model(1, mem_layers=[1, 2], num_key_value_heads=kv_heads, mem_top_k=top_k)
    ids = random_ids(2, L + 6 * W + 3, seed=2)
    assert max_err(run(model, ids).logits, reference_logits(model, ids)) < ATOL


def test_top_k_at_least_memory_size_is_exactly_dense():
    dense = tiny_model(1, mem_layers=[1, 2])
    ids = random_ids(1, L + 3 * W, seed=3)
    expected = run(dense, ids).logits
    for top_k in (3 * W, 1000):
        assert torch.equal(run(dense, ids, mem_top_k=top_k).logits, expected)


def test_per_call_top_k_overrides_config_and_reaches_generate():
    model = tiny_model(1, mem_layers=[1, 2], mem_top_k=2)
    ids = random_ids(1, L + 6 * W, seed=4)
    config_k = run(model, ids).logits
    assert torch.equal(run(model, ids, mem_top_k=2).logits, config_k)
    assert not torch.allclose(run(model, ids, mem_top_k=20).logits, config_k)
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out_2 = model.generate(ids, **greedy)
        out_20 = model.generate(ids, mem_top_k=20, **greedy)
        model.config.mem_top_k = 20
        assert torch.equal(model.generate(ids, **greedy), out_20)
    assert out_2.shape == out_20.shape


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_top_k_is_refused(bad):
    model = tiny_model(1)
    with pytest.raises(ValueError, match="mem_top_k"):
        run(model, random_ids(1, 20), mem_top_k=bad)
    with pytest.raises((ValueError, StrictDataclassError), match="mem_top_k"):  # the config's own type check
        type(model.config)(**{**model.config.to_dict(), "mem_top_k": bad})


def _filled_memory(B=2, Hkv=2, M=40, D=8, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    memory = LayerMemory("float32", **options)
    for n in (13, 20, M - 33):  # several writes; padding in row 0
        keys, values = torch.randn(B, Hkv, n, D, generator=g) * 2, torch.randn(B, Hkv, n, D, generator=g)
        valid = torch.ones(B, n, dtype=torch.bool)
        valid[0, : n // 3] = False
        memory.add(keys, values, valid)
    return memory


def _local_inputs(B=2, H=4, Hkv=2, t=3, D=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, H, t, D, generator=g) * 2
    key, value = torch.randn(B, Hkv, t, D, generator=g) * 2, torch.randn(B, Hkv, t, D, generator=g)
    visible = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(B, 1, t, t)
    return query, key, value, visible


def test_top_k_kernel_with_k_equal_to_memory_matches_dense():
    """The top-k path itself (not the dense shortcut) with k = memory size: every entry selected, same softmax."""
    memory = _filled_memory()
    query, key, value, visible = _local_inputs()
    dense, _ = blockwise_memory_attention_forward(None, query, key, value, visible, memory=memory, scaling=0.35)
    top, _ = topk_memory_attention_forward(None, query, key, value, visible, memory=memory, scaling=0.35, top_k=40)
    assert max_err(top, dense) < 1e-5


def test_top_k_kernel_never_selects_padding():
    memory = _filled_memory()
    query = torch.randn(2, 2, 4, 8)
    scores, ids = memory.search(query, 40)
    valid = torch.cat([block[2] for block in memory.blocks(torch.float32, "cpu", 2)], dim=-1)
    for b in range(2):
        found = ids[b][ids[b] >= 0]
        assert bool(valid[b, found].all())  # ids are positions: no eviction here
        assert int((ids[b, 0, 0] >= 0).sum()) == int(valid[b].sum())  # every valid entry, then -1 slots


def test_top_k_with_nan_in_memory_is_the_same_with_the_kernel_and_torch(monkeypatch):
    """Memory keys that hold NaN (an overflow upstream) are never retrieved: the compiled kernel and both torch paths
    agree (NaN scores count as -inf), and the answer stays finite."""
    from longllama import kernels
    from longllama.modeling import knn_longllama

    model = tiny_model(1, mem_layers=[1, 2], mem_top_k=3)
    cache = run(model, random_ids(1, L + 4 * W, seed=21)).cache
    for layer in memory_layers(cache):
        chunk = next(layer.memory_store.chunks())[1]
        chunk.keys.view()[0, 1, 2:9] = float("nan")
    question = random_ids(1, 3, seed=22)
    results = {}
    for path in ("kernel", "torch", "reference"):
        session = copy.deepcopy(cache)
        with monkeypatch.context() as patch:
            if path == "torch":
                patch.setattr(kernels, "_module", None)
            if path == "reference":
                patch.setitem(knn_longllama.INDEX_BACKENDS, "exact", knn_longllama.ExactIndex)
            results[path] = run(model, question, cache=session).logits
    assert results["kernel"].isfinite().all()
    assert max_err(results["torch"], results["kernel"]) < 1e-5
    assert max_err(results["reference"], results["kernel"]) < 1e-5


# --------------------------------------------------------------------------------------------------------------------
# index backends through the model
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "hnswlib"])
def test_approximate_backend_in_the_model(backend):
    pytest.importorskip(backend)
    exact = tiny_model(1, mem_layers=[1, 2], mem_top_k=4)
    approximate = tiny_model(1, mem_layers=[1, 2], mem_top_k=4, mem_index=backend)
    ids = random_ids(1, L + 8 * W, seed=5)
    # small memories (64 keys per set): the HNSW search is as good as exact
    assert max_err(run(approximate, ids).logits, run(exact, ids).logits) < 1e-4
    # k >= memory: dense, exactly, whatever the backend
    assert torch.equal(run(approximate, ids, mem_top_k=1000).logits, run(exact, ids, mem_top_k=1000).logits)


def test_missing_backend_names_the_extra(monkeypatch):
    model = tiny_model(1, mem_layers=[1, 2], mem_top_k=2, mem_index="faiss")
    monkeypatch.setattr(hnsw, "faiss", None)
    with pytest.raises(ImportError, match=r"longllama\[faiss\]"):
        run(model, random_ids(1, L + 3 * W))


# --------------------------------------------------------------------------------------------------------------------
# bounded memory
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_first", [0, 3])
def test_bounded_memory_matches_reference(keep_first):
    model = tiny_model(1, mem_layers=[1, 2], mem_max_tokens=2 * W + keep_first, mem_keep_first=keep_first)
    ids = random_ids(2, L + 7 * W + 2, seed=6)
    out = run(model, ids)
    assert max_err(out.logits, reference_logits(model, ids)) < ATOL
    assert out.cache.memory_length() == 2 * W + keep_first


@pytest.mark.parametrize("keep_first", [0, 5])
def test_eviction_keeps_the_first_and_the_most_recent_entries(keep_first):
    bounded = tiny_model(1, mem_layers=[1], mem_max_tokens=3 * W + keep_first, mem_keep_first=keep_first)
    unbounded = tiny_model(1, mem_layers=[1])
    ids = random_ids(1, L + 9 * W, seed=7)
    kept = run(bounded, ids).cache.layers[1].memory()
    full = run(unbounded, ids).cache.layers[1].memory()
    recent = 3 * W
    for got, want in zip(kept, full):
        expected = torch.cat([want[..., :keep_first, :], want[..., -recent:, :]], dim=-2) if want.dim() == 4 else (
            torch.cat([want[:, :keep_first], want[:, -recent:]], dim=1))
        assert torch.equal(got, expected)


def test_bounded_memory_stays_bounded_over_a_long_decode():
    model = tiny_model(1, mem_layers=[1], mem_max_tokens=2 * W)
    cache = run(model, random_ids(1, L + 4 * W, seed=8)).cache
    sizes = []
    with torch.no_grad():
        for step in range(60):
            model(random_ids(1, 1, seed=step), cache=cache, use_cache=True)
            sizes.append(cache.layers[1].memory_store.nbytes)
    assert cache.memory_length() <= 2 * W
    assert max(sizes[20:]) == max(sizes[:20])  # chunks are reused or freed, memory does not creep


def test_max_tokens_below_a_window_is_refused():
    with pytest.raises(ValueError, match="mem_max_tokens"):
        tiny_model(1, mem_max_tokens=W - 1)
    with pytest.raises(ValueError, match="mem_max_tokens"):
        tiny_model(1, mem_max_tokens=W + 2, mem_keep_first=3)


# --------------------------------------------------------------------------------------------------------------------
# storage dtypes, bytes per token, offload
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mem_dtype, element", [("bfloat16", 2), ("float16", 2), ("float32", 4), ("int8", 1)])
def test_memory_bytes_per_token(mem_dtype, element, monkeypatch):
    """Allocated bytes per memory token within 10% of 2 x memory layers x KV heads x head_dim x bytes(dtype) per row
    (int8 adds its float16 scales: 2 bytes per vector of head_dim 32). Chunks are scaled down (256 tokens here,
    10^3-10^5 in real models) so that a small memory holds many of them, as a real one does."""
    B, Hkv, D, layers = 2, 2, 32, 2
    monkeypatch.setattr(memory_longllama, "CHUNK_ELEMENTS", 256 * B * Hkv * D)
    model = tiny_model(1, mem_layers=[1, 2], num_key_value_heads=Hkv, hidden_size=128, mem_dtype=mem_dtype)
    cache = run(model, random_ids(B, L + 300 * W, seed=9)).cache
    tokens = cache.memory_length()
    per_token = sum(layer.memory_store.nbytes for layer in memory_layers(cache)) / tokens / B
    expected = 2 * layers * Hkv * D * element
    assert abs(per_token - expected) <= 0.1 * expected, (per_token, expected)


def test_int8_memory_is_close_to_float32_memory():
    ids = random_ids(1, L + 6 * W, seed=10)
    exact = run(tiny_model(1, mem_layers=[1, 2], mem_dtype="float32"), ids)
    int8 = run(tiny_model(1, mem_layers=[1, 2], mem_dtype="int8"), ids)
    keys, values, _ = exact.cache.layers[1].memory()
    keys8, values8, _ = int8.cache.layers[1].memory()
    assert keys8.dtype == torch.float32  # decoded for inspection
    for got, want in ((keys8, keys), (values8, values)):
        assert (got - want).abs().max() <= want.abs().amax(dim=-1, keepdim=True).max() / 127
    relative = (int8.logits - exact.logits).norm() / exact.logits.norm()
    assert relative < 0.02


def test_memory_on_an_explicit_device_gives_the_same_result():
    ids = random_ids(1, L + 4 * W, seed=11)
    plain = run(tiny_model(1, mem_layers=[1, 2]), ids).logits
    offloaded = tiny_model(1, mem_layers=[1, 2], mem_device="cpu")
    out = run(offloaded, ids)
    assert torch.equal(out.logits, plain)
    assert all(chunk.keys.data.device.type == "cpu" for layer in memory_layers(out.cache)
               for _, chunk in layer.memory_store.chunks())


# --------------------------------------------------------------------------------------------------------------------
# saved sessions
# --------------------------------------------------------------------------------------------------------------------


def _saved_model(tmp_path, seed=1, **overrides):
    model = tiny_model(seed, mem_layers=[1, 2], **overrides)
    model.save_pretrained(tmp_path / "model")
    return model, LongLlamaForCausalLM.from_pretrained(tmp_path / "model").eval()


@pytest.mark.parametrize("overrides", [{}, {"mem_dtype": "int8"}, {"mem_max_tokens": 3 * W, "mem_keep_first": 2}])
def test_saved_session_continues_exactly(tmp_path, overrides):
    model, reloaded = _saved_model(tmp_path, **overrides)
    document, question = random_ids(2, L + 7 * W + 3, seed=12), random_ids(2, 11, seed=13)
    cache = run(model, document).cache
    cache.save(tmp_path / "session")
    assert sorted(os.listdir(tmp_path / "session")) == [tensors_file(tmp_path / "session").name, "session.json"]
    expected = run(model, question, cache=cache).logits
    loaded = LongLlamaCache.load(tmp_path / "session", reloaded)
    assert loaded.get_seq_length() == document.shape[1]
    assert torch.equal(run(reloaded, question, cache=loaded).logits, expected)
    # the saved session is unchanged: it answers a second question as the first time
    again = LongLlamaCache.load(tmp_path / "session", reloaded)
    assert torch.equal(run(reloaded, question, cache=again).logits, expected)


def test_session_of_another_model_is_refused(tmp_path):
    model = tiny_model(1, mem_layers=[1, 2])
    run(model, random_ids(1, 30)).cache.save(tmp_path / "session")
    with pytest.raises(ValueError, match="another model .configuration mem_layers: saved .1, 2., this model .1."):
        LongLlamaCache.load(tmp_path / "session", tiny_model(1, mem_layers=[1]))
    with pytest.raises(ValueError, match=r"another model \(embeddings and weights of layers 0, 1, 2, 3 differ\)"):
        LongLlamaCache.load(tmp_path / "session", tiny_model(2, mem_layers=[1, 2]))


def test_corrupted_or_missing_session_is_refused(tmp_path):
    model = tiny_model(1, mem_layers=[1, 2])
    run(model, random_ids(1, 30)).cache.save(tmp_path / "session")
    with pytest.raises(FileNotFoundError, match="No saved LongLLaMA session"):
        LongLlamaCache.load(tmp_path / "nowhere", model)
    tensors = tensors_file(tmp_path / "session")
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        LongLlamaCache.load(tmp_path / "session", model)
    (tmp_path / "session" / "session.json").write_text('{"format": "longllama-session", "vers')
    with pytest.raises(ValueError, match="corrupted"):
        LongLlamaCache.load(tmp_path / "session", model)


@pytest.mark.parametrize("edit", ["segment", "chunks", "layers", "length", "seen_tokens"])
def test_hand_edited_session_file_is_refused(tmp_path, edit):
    """`session.json` edited so that it no longer describes the (intact) tensors is refused: the tensors file carries
    a checksummed copy of it. Crafted to match (both files rewritten, checksum updated), the layout is still checked:
    a clear error, never a crash deep inside loading or a cache that silently differs."""
    from safetensors.torch import load_file, save_file

    model = tiny_model(1, mem_layers=[1, 2])
    run(model, random_ids(1, L + 3 * W)).cache.save(tmp_path / "session")
    path = tmp_path / "session" / "session.json"
    session = json.loads(path.read_text())
    state = session["layers"][1]
    if edit == "segment":
        state["chunks"][0]["segment"] = 7
    elif edit == "chunks":
        state["chunks"].append({"segment": 0, "first_id": 999, "limit": 64})
    elif edit == "layers":
        session["layers"][1] = None
    elif edit == "length":
        state["length"] += 1
    else:
        session["seen_tokens"] = 2**63
    path.write_text(json.dumps(session))
    with pytest.raises(ValueError, match="session.json was changed after the session was saved"):
        LongLlamaCache.load(tmp_path / "session", model)
    tensors_path = tensors_file(tmp_path / "session")
    described = {key: value for key, value in session.items() if key not in ("tensors", "sha256")}
    save_file(load_file(tensors_path), tensors_path, metadata={"format": "longllama-session",
                                                               "session": json.dumps(described)})
    session["sha256"] = hashlib.sha256(tensors_path.read_bytes()).hexdigest()
    path.write_text(json.dumps(session))
    with pytest.raises(ValueError, match="consistent LongLLaMA session"):
        LongLlamaCache.load(tmp_path / "session", model)


def test_save_never_overwrites_other_data_and_replaces_a_session_whole(tmp_path):
    """A directory of the user's files takes a session beside them; a re-save replaces only the session's own files;
    a directory whose session.json is not a session is refused."""
    model = tiny_model(1, mem_layers=[1, 2])
    cache = run(model, random_ids(1, 30)).cache
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"meow")
    cache.save(photos)
    bigger = run(model, random_ids(1, 60, seed=1)).cache
    bigger.save(photos)
    assert (photos / "cat.jpg").read_bytes() == b"meow"
    assert sorted(os.listdir(photos)) == ["cat.jpg", tensors_file(photos).name, "session.json"]
    assert LongLlamaCache.load(photos, model).get_seq_length() == 60
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "session.json").write_text('{"meeting": "tuesday"}')
    with pytest.raises(FileExistsError, match="not a readable LongLLaMA session"):
        cache.save(notes)
    assert (notes / "session.json").read_text() == '{"meeting": "tuesday"}' and len(os.listdir(notes)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "photos"]  # no partial directories left


def tensors_file(directory):
    """The tensors file of the session saved in `directory` (`memory.<16 hex>.safetensors`)."""
    (path,) = directory.glob("memory.*.safetensors")
    return path


# --------------------------------------------------------------------------------------------------------------------
# beam search and num_return_sequences
# --------------------------------------------------------------------------------------------------------------------


def _without_sharing(model, **kwargs):
    """generate() where every beam reads the prompt itself and keeps its own memory copy (the published way)."""
    original = type(model)._shared_prefill_repeats
    type(model)._shared_prefill_repeats = lambda *args: 1
    try:
        with torch.no_grad():
            return model.generate(**kwargs)
    finally:
        type(model)._shared_prefill_repeats = original


@pytest.mark.parametrize("new_tokens", [3, 2 * W])  # the second one flushes beams' local contexts to memory
def test_beam_search_shares_memory_and_equals_per_beam_copies(new_tokens):
    model = tiny_model(1, mem_layers=[1, 2])
    ids = random_ids(2, L + 5 * W + 1, seed=14)
    kwargs = dict(input_ids=ids, num_beams=3, num_return_sequences=2, max_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        shared = model.generate(**kwargs)
    copied = _without_sharing(model, **kwargs)
    assert torch.equal(shared.sequences, copied.sequences)
    assert max_err(shared.sequences_scores, copied.sequences_scores) < 1e-4
    cache = shared.past_key_values
    first_chunk = next(memory_layers(cache)[0].memory_store.chunks())[1]
    assert first_chunk.keys.data.shape[0] == 2  # the prompt's memory has one row per prompt, not per beam
    assert cache.batch_size_ == 6


def test_num_return_sequences_with_sampling_shares_memory():
    model = tiny_model(1, mem_layers=[1, 2])
    ids = random_ids(1, L + 5 * W, seed=15)
    kwargs = dict(input_ids=ids, do_sample=True, num_return_sequences=4, max_new_tokens=6, pad_token_id=0,
                  return_dict_in_generate=True)
    torch.manual_seed(0)
    with torch.no_grad():
        shared = model.generate(**kwargs)
    torch.manual_seed(0)
    copied = _without_sharing(model, **kwargs)
    assert torch.equal(shared.sequences, copied.sequences) and shared.sequences.shape[0] == 4
    assert next(memory_layers(shared.past_key_values)[0].memory_store.chunks())[1].keys.data.shape[0] == 1


# --------------------------------------------------------------------------------------------------------------------
# device maps
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["cpu", "auto", "disk_offload"])
def test_device_maps_give_the_same_generation(tmp_path, where):
    """An explicit per-layer CPU map, "auto", and a map that offloads layer 2 (a memory layer) to disk, which runs
    through accelerate's hooks: the same tokens; each layer's memory on its layer's execution device."""
    pytest.importorskip("accelerate")
    model, _ = _saved_model(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers)})
    if where == "disk_offload":
        device_map["model.layers.2"] = "disk"
    ids = random_ids(1, L + 4 * W, seed=16)
    generation = dict(max_new_tokens=2 * W, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(ids, **generation).sequences
    mapped = LongLlamaForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto" if where == "auto" else device_map, offload_folder=tmp_path / "offload"
    ).eval()
    with torch.no_grad():
        out = mapped.generate(ids, **generation)
    assert torch.equal(out.sequences, expected)
    for layer in memory_layers(out.past_key_values):
        assert all(chunk.keys.data.device.type == "cpu" for _, chunk in layer.memory_store.chunks())
