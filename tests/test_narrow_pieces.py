"""Rows stored in narrow pieces (row_packing.row_pieces(narrow=True)) on every torch path,
against PEFT: a tiny Llama whose hidden width leaves page slack (hidden 96, 6 heads of 16, 2 KV
heads: pages of 1,024 elements, 1,024 % 96 = 64, so the 96-wide rows are stored as 3 pieces of
32; intermediate 176 as 11 pieces of 16): the vocabulary modules (their hidden-wide rows in
pieces), DoRA scale rows in pieces, 8+ adapters in a decode (the BGMV form), fused q/k/v,
merged LoRA, tensor parallelism (a rank's widths pieced alike by the driver and the workers)
and the static layout. (Written by a reviewer of the change; the stock tiny model's widths
divide its pages, so it never pieces a hidden-wide row.)"""

from __future__ import annotations

import pytest
from support import (
    PeftOracle,
    PeftReference,
    check_output,
    random_prompt,
    save_random_adapter,
    save_random_dora_adapter,
    save_random_llama,
    scored,
)

from pagedlora import Engine, SamplingParams
from pagedlora.lora_adapter import VOCAB_LAYER

SLACK = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
ASK = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3,
                     prompt_logprobs=3)


@pytest.fixture(scope="module")
def slack(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("slack")
    model = save_random_llama(root / "model", default_model_dir, seed=7, **SLACK)
    dirs = {
        "vocab": save_random_adapter(model, root / "vocab", r=3, seed=11,
                                     target_modules=["embed_tokens", "lm_head", "q_proj"]),
        "dora": save_random_dora_adapter(model, root / "dora", r=4, seed=12,
                                         target_modules=["q_proj", "o_proj", "gate_proj",
                                                         "down_proj"]),
    }
    for i in range(7):
        dirs[f"p{i}"] = save_random_adapter(model, root / f"p{i}", r=1 + i, seed=20 + i,
                                            target_modules=["q_proj", "k_proj", "v_proj",
                                                            "o_proj", "up_proj"])
    return model, dirs


def test_pieced_rows_on_every_torch_path_match_peft(slack):
    model, dirs = slack
    engine = Engine(model, pool_gb=0.05, max_lora_rank=8, kernel_backend="torch")
    assert engine.pool.page_numel == 1024
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    prompts = [random_prompt(6 + i, seed=40 + i) for i in range(len(dirs) + 1)]
    adapters = [None, *dirs]
    outs = engine.generate(prompts, adapters=adapters, sampling_params=ASK, progress=False)
    # the rows really are in pieces
    vocab = engine.adapters.resident(engine.adapters.key_of("vocab"))
    assert vocab.modules[(0, "q_proj")].a.pages.shape == (3, 3)
    assert vocab.modules[(VOCAB_LAYER, "embed_tokens")].b.pages.shape == (3, 3)
    assert vocab.modules[(VOCAB_LAYER, "lm_head")].a.pages.shape == (3, 3)
    dora = engine.adapters.resident(engine.adapters.key_of("dora"))
    assert dora.modules[(0, "o_proj")].dora.pages.shape == (1, 3)
    assert dora.modules[(0, "gate_proj")].dora.pages.shape == (1, 11)
    ref = PeftReference(model, dirs)
    for o in outs:
        check_output(o, scored(ref, o))


def test_pieced_rows_merged_match_peft(slack):
    model, dirs = slack
    oracle = PeftOracle(model, {"dora": dirs["dora"], "p3": dirs["p3"]})
    engine = Engine(model, pool_gb=0.05, max_lora_rank=8, kernel_backend="torch",
                    merge_policy="auto")
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for name in ("dora", "p3"):
        engine.add_adapter(name, dirs[name])
        prompt = random_prompt(9, seed=77)
        out = engine.generate([prompt], adapters=name, sampling_params=greedy,
                              progress=False)[0]
        assert out.token_ids == oracle.greedy(name, prompt, 24), name
    assert engine.core.runner.merged.stats.merges >= 1


def test_pieced_rows_under_tensor_parallelism_match_peft(slack):
    """tp=2 on the CPU: a rank's widths (q's out 48, up's 88, o's DoRA row 96 on 512-element
    pages) are pieced alike in the driver's packer and each worker's."""
    model, dirs = slack
    names = ["vocab", "dora", "p5"]
    engine = Engine(model, pool_gb=0.05, max_lora_rank=8, kernel_backend="torch",
                    tensor_parallel_size=2)
    try:
        for name in names:
            engine.add_adapter(name, dirs[name])
        prompts = [random_prompt(7 + i, seed=90 + i) for i in range(len(names))]
        outs = engine.generate(prompts, adapters=names, sampling_params=ASK, progress=False)
        dora = engine.adapters.resident(engine.adapters.key_of("dora"))
        assert dora.modules[(0, "o_proj")].dora.pages.shape == (1, 3)
    finally:
        engine.close()
    ref = PeftReference(model, {n: dirs[n] for n in names})
    for o in outs:
        check_output(o, scored(ref, o))


def test_pieced_rows_in_the_static_layout_fit_its_slot_and_match_peft(slack):
    model, dirs = slack
    names = ["dora", "p6"]
    engine = Engine(model, pool_gb=0.05, max_lora_rank=8, kernel_backend="torch",
                    memory_layout="static", max_loras=2)
    for name in names:
        engine.add_adapter(name, dirs[name])
    prompts = [random_prompt(8, seed=95 + i) for i in range(len(names))]
    outs = engine.generate(prompts, adapters=names, sampling_params=ASK, progress=False)
    ref = PeftReference(model, {n: dirs[n] for n in names})
    for o in outs:
        check_output(o, scored(ref, o))
