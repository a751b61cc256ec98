"""LoRA on embed_tokens and lm_head: PEFT's semantics on tied and untied bases, PEFT's
``ensure_weight_tying``, the base weights PEFT saves beside such adapters, and rows wider than
a page split across pages."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import (
    PeftReference,
    check_output,
    random_prompt,
    save_random_adapter,
    save_random_llama,
    scored,
)

from pagedlora import AdapterError, Engine, SamplingParams
from pagedlora.lora_adapter import VOCAB_LAYER

PEFT = "base_model.model."
ASK = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3,
                     prompt_logprobs=3)


@pytest.fixture(scope="module")
def vocab_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    dirs = {"tie": save_random_adapter(tiny_llama_dir, root / "tie", r=4, seed=401,
                                       target_modules=["embed_tokens", "v_proj"],
                                       ensure_weight_tying=True),
            "plain": save_random_adapter(tiny_llama_dir, root / "plain", r=5, seed=402,
                                         target_modules=["embed_tokens", "lm_head"])}
    # PEFT ties lm_head to the embedding's LoRA even when the file holds no lm_head weights
    dirs["tie-nohead"] = shutil.copytree(dirs["tie"], root / "tie-nohead")
    st = dirs["tie-nohead"] / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(st).items() if "lm_head" not in k}, st)
    return dirs


def test_the_files_are_what_the_tests_mean(vocab_dirs):
    tie = load_file(vocab_dirs["tie"] / "adapter_model.safetensors")
    assert json.loads((vocab_dirs["tie"] / "adapter_config.json").read_text())[
        "ensure_weight_tying"] is True
    assert torch.equal(tie[PEFT + "lm_head.lora_A.weight"],
                       tie[PEFT + "model.embed_tokens.lora_embedding_B"].t())
    assert PEFT + "model.embed_tokens.base_layer.weight" in tie  # save_embedding_layers
    nohead = load_file(vocab_dirs["tie-nohead"] / "adapter_model.safetensors")
    assert not any("lm_head" in k for k in nohead)


def test_tied_lm_head_as_peft_ties_it(tiny_llama_dir, vocab_dirs):
    """ensure_weight_tying: with or without lm_head weights in the file, PEFT's logprobs; the
    two files are one content (the derived lm_head LoRA is the saved one)."""
    ref = PeftReference(tiny_llama_dir, vocab_dirs)
    engine = Engine(tiny_llama_dir, pool_gb=0.05, max_lora_rank=8)
    added = {name: engine.add_adapter(name, path) for name, path in vocab_dirs.items()}
    assert (VOCAB_LAYER, "lm_head") in added["tie-nohead"].modules
    assert added["tie"].key == added["tie-nohead"].key
    prompt = random_prompt(10, seed=5)
    outs = engine.generate([prompt] * 4, adapters=[None, *vocab_dirs], sampling_params=ASK,
                           progress=False)
    for o in outs:
        check_output(o, scored(ref, o))
    lm_head_delta = (ref.logprobs("tie", prompt) - ref.logprobs(None, prompt)).abs().max()
    assert lm_head_delta > 1e-2


def test_an_untied_base_takes_lora_on_each_of_its_two_matrices(tmp_path, default_model_dir):
    model = save_random_llama(tmp_path / "untied", default_model_dir, seed=3,
                              tie_word_embeddings=False)
    dirs = {"ad": save_random_adapter(model, tmp_path / "ad", r=3, seed=403,
                                      target_modules=["embed_tokens", "lm_head", "o_proj"])}
    ref = PeftReference(model, dirs)
    engine = Engine(model, pool_gb=0.05, max_lora_rank=8)
    assert not engine.model.tied_embeddings
    engine.add_adapter("ad", dirs["ad"])
    prompt = random_prompt(9, seed=6)
    for o in engine.generate([prompt, prompt], adapters=["ad", None], sampling_params=ASK,
                             progress=False):
        check_output(o, scored(ref, o))


def _edited(src, dst, change):
    shutil.copytree(src, dst)
    st = dst / "adapter_model.safetensors"
    tensors = dict(load_file(st))
    change(tensors)
    save_file(tensors, st)
    return dst


def test_base_weights_saved_beside_must_be_the_model_s(tiny_llama_dir, vocab_dirs, tmp_path):
    engine = Engine(tiny_llama_dir, pool_gb=0.02)
    key = PEFT + "model.embed_tokens.base_layer.weight"

    def retrained(t):
        t[key] = t[key] + 0.1

    def resized(t):
        t[key] = torch.cat([t[key], t[key][:8]])

    def rounded(t):  # the same weights in bf16: accepted
        t[key] = t[key].to(torch.bfloat16)

    for change, words in ((retrained, "differ from the base model's (max |diff| 0.1"),
                          (resized, "shape (49160, 64)")):
        path = _edited(vocab_dirs["plain"], tmp_path / change.__name__, change)
        with pytest.raises(AdapterError, match=r"embed_tokens\.base_layer\.weight holds its own "
                                               r"embed_tokens weights"):
            engine.add_adapter(change.__name__, path)
        with pytest.raises(AdapterError, match=re.escape(words)):
            engine.add_adapter(change.__name__, path)
    engine.add_adapter("rounded", _edited(vocab_dirs["plain"], tmp_path / "rounded", rounded))
    assert engine.adapters.names == ["rounded"]


def test_lm_head_weights_that_contradict_the_tie_are_refused(tiny_llama_dir, vocab_dirs,
                                                             tmp_path):
    engine = Engine(tiny_llama_dir, pool_gb=0.02)

    def untie(t):
        t[PEFT + "lm_head.lora_B.weight"] = t[PEFT + "lm_head.lora_B.weight"] * 2

    def no_embedding(t):
        for k in [k for k in t if "embed_tokens" in k]:
            del t[k]

    with pytest.raises(AdapterError, match="not embed_tokens' transposed"):
        engine.add_adapter("x", _edited(vocab_dirs["tie"], tmp_path / "untie", untie))
    with pytest.raises(AdapterError, match="none for embed_tokens"):
        engine.add_adapter("y", _edited(vocab_dirs["tie"], tmp_path / "noemb", no_embedding))
    assert engine.adapters.names == []


def test_rows_wider_than_a_page_are_split_across_pages(tiny_llama_dir, vocab_dirs):
    """Block 16 x 2 KV heads x head_dim 16 x K,V: pages of 1024 elements; a vocabulary row
    (49152) is 48 pages. Rank 5 on embed_tokens and lm_head: 2 x 5 x 48 pages for the wide
    rows, and 5 + 5 rows of 64 (16 a page) for the narrow ones, which fill 640 elements of one
    page and so go to a shared page. Every row reads back as the file's."""
    engine = Engine(tiny_llama_dir, pool_gb=0.05, block_size=16)
    assert engine.pool.page_numel == 1024
    engine.add_adapter("plain", vocab_dirs["plain"])
    key = engine.adapters.key_of("plain")
    assert engine.adapters.footprint(key) == 2 * 5 * 48 + 1
    engine.generate([[5, 6, 7]], adapters="plain", progress=False)
    placed = engine.adapters.resident(key)
    assert len(placed.pages) == len(set(placed.pages)) == 2 * 5 * 48
    assert len(placed.shared_pages) == 1 and sum(e - s for _, s, e in placed.spans) == 640
    file = load_file(vocab_dirs["plain"] / "adapter_model.safetensors")
    embed = placed.modules[(VOCAB_LAYER, "embed_tokens")]
    head = placed.modules[(VOCAB_LAYER, "lm_head")]
    assert embed.a.pages.shape == (5, 48) and head.b.pages.shape == (5, 48)
    pool = engine.pool
    assert torch.equal(pool.read_rows(49152, embed.a),
                       file[PEFT + "model.embed_tokens.lora_embedding_A"])
    assert torch.equal(pool.read_rows(64, embed.b),
                       file[PEFT + "model.embed_tokens.lora_embedding_B"].t())
    assert torch.equal(pool.read_rows(64, head.a), file[PEFT + "lm_head.lora_A.weight"])
    assert torch.equal(pool.read_rows(49152, head.b), file[PEFT + "lm_head.lora_B.weight"].t())
    assert placed.used_elements == 2 * 5 * (49152 + 64)


def test_the_static_layout_refuses_vocabulary_adapters_by_name(tiny_llama_dir, vocab_dirs):
    engine = Engine(tiny_llama_dir, pool_gb=0.05, memory_layout="static", max_loras=2,
                    max_lora_rank=8)
    with pytest.raises(AdapterError, match="'plain' cannot be placed in the pool: an adapter "
                                           "of 481 pages does not fit an adapter slot"):
        engine.add_adapter("plain", vocab_dirs["plain"])
    assert engine.adapters.names == []


def test_a_tied_adapter_spills_to_disk_and_back(tiny_llama_dir, vocab_dirs, tmp_path):
    """The derived lm_head LoRA is its own tensors (safetensors refuses shared memory), so
    the tied adapter round-trips through the spill tier."""
    from pagedlora.lora_adapter import read_lora_adapter
    from pagedlora.spill import SpillDir

    model = Engine(tiny_llama_dir, pool_gb=0.02).model
    adapter, weights = read_lora_adapter(
        "tie-nohead", vocab_dirs["tie-nohead"], num_layers=model.num_layers,
        module_shapes=model.lora_module_shapes, max_lora_rank=8, dtype=torch.float32,
        base_vocab=model.base_vocab)
    spill = SpillDir(tmp_path / "spill")
    assert spill.write(adapter, weights)
    back = spill.read(adapter)
    assert back is not None and set(back) == set(weights)
    assert torch.equal(back[(VOCAB_LAYER, "lm_head")].b_t,
                       weights[(VOCAB_LAYER, "embed_tokens")].a)
