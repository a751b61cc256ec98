"""Unified pool accounting: adapter pages by rank, internal fragmentation, GGUF/HF model files."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from pagedlora import Engine, SamplingParams
from pagedlora.model_files import resolve_model


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, max_lora_rank=64)


def test_adapter_pages_and_fragmentation_match_the_peft_file(engine, tiny_llama_dir,
                                                               make_adapter):
    path = make_adapter(tiny_llama_dir, "r12", r=12, target_modules=["q_proj", "k_proj",
                                                                      "down_proj"], seed=1)
    engine.add_adapter("r12", path)
    engine.generate([[5, 6, 7]], adapters="r12", progress=False,
                    sampling_params=SamplingParams(max_tokens=2, temperature=0))
    s = engine.stats()
    weights = sum(t.numel() for t in load_file(path / "adapter_model.safetensors").values())
    page_numel = s["page_bytes"] // 4
    allocated = s["pages_adapter"] * page_numel
    assert s["adapters_resident"] == ["r12"] and s["pages_kv"] == s["pages_kv_cached"]
    assert math.isclose(s["internal_fragmentation"], 1 - weights / allocated)
    # rows never pad to max_lora_rank: at most one partly filled page per (layer, row width);
    # widths here: 64 (q/k lora_A, q lora_B^T, down lora_B^T), 32 (k lora_B^T), 176 (down A)
    assert allocated - weights < 2 * 3 * page_numel
    assert s["pages_adapter"] >= math.ceil(weights / page_numel)


def test_kv_fragmentation_counts_unused_slots_of_partial_blocks(engine):
    r = engine.add_request(list(range(10, 21)), None, SamplingParams(max_tokens=5))
    engine.step()  # 11 prompt tokens computed -> 2 blocks of 8 per layer
    s = engine.stats()
    assert s["pages_kv"] == 2 * 2
    resident = engine.adapters
    adapter_used = sum(resident.resident(k).used_elements for k in resident.resident_keys)
    page_numel = s["page_bytes"] // 4
    kv_used = 11 * page_numel // 8 * 2  # 11 tokens x (page_numel / block_size) x 2 layers
    total = (s["pages_kv"] + s["pages_adapter"]) * page_numel
    assert math.isclose(s["internal_fragmentation"], 1 - (kv_used + adapter_used) / total)
    engine.abort(r)
    assert [o.output.finish_reason for o in engine.step()] == ["abort"]
    s = engine.stats()
    assert s["pages_kv"] == s["pages_kv_cached"] == 2  # its full block stays cached


def test_gguf_file_is_converted_once_and_cached(default_model_dir):
    from pagedlora.model_files import default_model_path

    assert resolve_model(default_model_path()) == default_model_dir
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "tokenizer.json").is_file()


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(tmp_path)


def test_identity_is_the_content(engine, tiny_llama_dir, make_adapter):
    one = make_adapter(tiny_llama_dir, "one", r=4, target_modules=["q_proj", "v_proj"], seed=5)
    two = make_adapter(tiny_llama_dir, "two", r=8, target_modules=["o_proj"], seed=6)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = [[11, 12, 13, 14]]
    engine.add_adapter("x", one)
    engine.add_adapter("twin", one)  # same weights, another name: the same pages
    assert engine.adapters.key_of("x") == engine.adapters.key_of("twin")
    first = engine.generate(prompt, adapters="x", sampling_params=sp, progress=False)[0]
    twin = engine.generate(prompt, adapters="twin", sampling_params=sp, progress=False)[0]
    assert twin.token_ids == first.token_ids
    pages_one = engine.stats()["pages_adapter"]
    engine.add_adapter("x", two)  # re-added with other weights: a new adapter
    assert engine.adapters.key_of("x") != engine.adapters.key_of("twin")
    second = engine.generate(prompt, adapters="x", sampling_params=sp, progress=False)[0]
    fresh = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8)
    fresh.add_adapter("x", two)
    assert second.token_ids == fresh.generate(prompt, adapters="x", sampling_params=sp,
                                              progress=False)[0].token_ids
    assert second.token_ids != first.token_ids
    assert engine.stats()["pages_adapter"] > pages_one  # "twin" still holds the old content
    before = engine.stats()["pages_adapter"]
    old_key = engine.adapters.key_of("twin")
    old = engine.adapters.resident(old_key)
    alone = [p for p in old.shared_pages  # shared pages it is the only tenant of
             if engine.pool.allocator.tenants_of(p) == {engine.adapters.unit_of(old_key)}]
    old_pages = len(old.pages) + len(alone)
    engine.add_adapter("twin", two)  # nothing names the old content now: its pages go back
    assert engine.stats()["pages_adapter"] == before - old_pages
    engine.pool.allocator.check_invariants()
