"""Under tensor parallelism (CPU, gloo, 2 worker processes) what issues 16 and 17 added:
log-probabilities and prompt log-probabilities over the vocab-parallel LM head (its logits
gathered to rank 0), LoRA on embed_tokens and lm_head (their vocab-parallel halves), DoRA (its
scale rows split by output features, whole after a row-parallel module's all-reduce; the
norm computed by the driver from the model's files), per-request scales and weighted mixes:
against HF+PEFT and one process. One TP=2 engine for the module (a start spawns two
processes that import torch)."""

from __future__ import annotations

import pytest
from support import (
    OracleSampler,
    PeftOracle,
    PeftReference,
    check_output,
    drive,
    logits_rtol,
    model_config,
    random_prompt,
    recording_within,
    rows_apart,
    save_adapters,
    save_random_adapter,
    save_random_dora_adapter,
    save_random_llama,
    scored,
    write_random_lora,
)

from pagedlora import AdapterMix, Engine, SamplingParams
from pagedlora.lora_adapter import TARGET_MODULES

ALL = list(TARGET_MODULES)  # the seven decoder projections
PEFT_ADAPTERS = {
    "lora4": dict(r=4, target_modules=ALL, seed=401),
    "lora16": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], seed=402),
    "lora8": dict(r=8, target_modules=["o_proj", "gate_proj", "down_proj"], seed=403),
    "voc": dict(r=4, target_modules=["embed_tokens", "lm_head", "v_proj"], seed=404),
    # test_lora_vocab's tied adapter (an o_proj one puts prompt logprobs near -500 nats,
    # where float32's spacing is 3e-5 and two correct sums differ by more than 1e-4)
    "tie": dict(r=4, target_modules=["embed_tokens", "v_proj"], ensure_weight_tying=True,
                seed=405),
}
SMALL = {f"s{i}": dict(r=2 + i, target_modules=["q_proj", "v_proj", "down_proj"], seed=410 + i)
         for i in range(5)}  # more adapters, so a decode step takes the BGMV form
MIX_A = AdapterMix({"lora4": 0.7, "lora16": 0.3})
MIX_B = AdapterMix({"lora16": -0.5, "lora8": 1.5, "lora4": 0.25})
HALF = AdapterMix({"lora4": 0.5})  # a scaled single adapter
MIX_V = AdapterMix({"voc": 0.6, "lora8": -0.75})  # on embed_tokens and lm_head too
MIX_S = AdapterMix({"s0": 0.6, "s3": 1.2, "lora8": 0.4})
PROMPTS = [random_prompt(n, seed=600 + n) for n in (4, 11, 18, 26)]
OPTIONS = dict(pool_gb=0.05, max_lora_rank=16, block_size=8)
TP_ATOL = 1e-4  # the bound on fp32 logits, two ranks against one process


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp-features")
    found = save_adapters(tiny_llama_dir, root, PEFT_ADAPTERS)
    found.update({name: write_random_lora(root / name, **o) for name, o in SMALL.items()})
    found["dora"] = save_random_dora_adapter(tiny_llama_dir, root / "dora", r=8, seed=420,
                                             target_modules=ALL)
    return found


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir, dirs):
    # "tie" (ensure_weight_tying) is checked against a PeftModel of its own (the logprobs
    # test): loaded beside other adapters, PEFT does not tie it
    return PeftOracle(tiny_llama_dir, {n: d for n, d in dirs.items() if n != "tie"})


def _engine(model_dir, dirs, **options) -> Engine:
    engine = Engine(model_dir, sampler=OracleSampler(), max_loras=len(dirs),
                    **{**OPTIONS, **options})
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def tp2(tiny_llama_dir, dirs):
    """TP=2, the test's sampler in the driver (rank 0 sends the logits)."""
    with _engine(tiny_llama_dir, dirs, tensor_parallel_size=2) as e:
        yield e


@pytest.fixture(scope="module")
def single(tiny_llama_dir, dirs):
    with _engine(tiny_llama_dir, dirs) as e:
        yield e


def _plan(name: str) -> dict:
    if name == "dense":
        first = [("base", PROMPTS[3], None), ("mixA", PROMPTS[3], MIX_A),
                 ("mixB", PROMPTS[2], MIX_B), ("half", PROMPTS[3], HALF),
                 ("voc", PROMPTS[1], "voc"), ("dora", PROMPTS[2], "dora"),
                 ("mixV", PROMPTS[1], MIX_V)]
        return {0: first, 2: [("mixA-late", PROMPTS[0], MIX_A), ("lora4", PROMPTS[1],
                                                               "lora4")]}
    first = [("base", PROMPTS[0], None), ("mixS", PROMPTS[1], MIX_S),
             ("mixA", PROMPTS[0], MIX_A), ("half", PROMPTS[1], HALF),
             ("dora", PROMPTS[0], "dora"), ("voc", PROMPTS[1], "voc"),
             *[(n, PROMPTS[i % 2], n) for i, n in enumerate(["s1", "s2", "s4", "lora8"])]]
    return {0: first, 2: [("mixB-late", PROMPTS[0], MIX_B), ("s0", PROMPTS[1], "s0")]}


@pytest.mark.parametrize("plan", ["dense", "bgmv"])
def test_mixes_scales_dora_vocabulary_lora_and_base_match_peft_and_one_process(
        tp2, single, oracle, plan):
    """Mixes (one with a negative weight, one on embed_tokens/lm_head), a scaled adapter, a
    DoRA adapter on all seven projections, LoRA on embed_tokens and lm_head, plain and base
    requests in the same steps, later arrivals beside decodes: every logits
    row within the project's tolerance of PEFT's, and within 1e-4 of one process's.
    "dense": few adapters (dense decode form, segment loop for the long prefill); "bgmv":
    ten adapters in the decode steps."""
    two, one = {}, {}
    rtol = logits_rtol(model_config(tp2))
    arrivals = _plan(plan)
    d = drive(tp2, arrivals, oracle.logits, max_tokens=4, compare=recording_within(two, rtol))
    assert d.num_compared == 4 * sum(map(len, arrivals.values())) and d.mixed_steps()
    if plan == "bgmv":
        assert max(len({k for _, a, *_ in s for k in _names(a)}) for s in d.steps) >= 8
    drive(single, arrivals, oracle.logits, max_tokens=4, compare=recording_within(one, rtol))
    err = rows_apart(two, one)
    assert err <= TP_ATOL, err


def _names(adapter) -> list[str]:
    if adapter is None:
        return []
    return adapter.names if isinstance(adapter, AdapterMix) else [adapter]


def test_logprobs_and_prompt_logprobs_equal_peft(tp2, tiny_llama_dir, dirs):
    """The sampled tokens' and the prompts' log-probabilities, ranks and top tokens over the
    whole vocabulary (gathered from both ranks' halves), with adapters on the vocabulary
    modules, DoRA and the base: PEFT's within 1e-4 nats. The driver samples here (rank 0
    sends the logits); rank 0 samples in the uneven-vocabulary test below."""
    names = [None, "voc", "tie", "dora", "lora8"]
    ref = PeftReference(tiny_llama_dir, {n: dirs[n] for n in names if n})
    ask = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3,
                         prompt_logprobs=3)
    outs = tp2.generate([random_prompt(9 + i, seed=650 + i) for i in range(len(names))],
                        adapters=names, sampling_params=ask, progress=False)
    for o in outs:
        assert o.finish_reason == "length", o.error
        check_output(o, scored(ref, o))


def test_dora_norms_are_computed_by_the_driver_from_the_files(tp2, single):
    """The driver holds no model; a DoRA adapter registered there has one process's content
    (its key hashes the output scales m / ||W + sBA||, from the same base weights), and the
    tied lm_head LoRA derived from the embedding's and the checked base copies are one
    process's too."""
    assert tp2.model is None
    for name in ("dora", "tie", "voc"):
        assert tp2.adapters.key_of(name) == single.adapters.key_of(name), name
    assert tp2.adapters.is_dora(tp2.adapters.key_of("dora"))

def test_uneven_vocabulary_rows_are_padded_on_the_last_rank(tmp_path_factory,
                                                            default_model_dir):
    """A vocabulary that does not split evenly (49,153 rows over 2 ranks: the last one
    padded) with LoRA on embed_tokens and lm_head of an untied base, rank 0 sampling: the
    log-probabilities of prompt and output (which PEFT's greedy tokens they are) equal
    PEFT's."""
    root = tmp_path_factory.mktemp("tp-odd-vocab")
    model = save_random_llama(root / "odd", default_model_dir, seed=5, vocab_size=49153,
                              tie_word_embeddings=False)
    dirs = {"v": save_random_adapter(model, root / "v", r=3, seed=661,
                                     target_modules=["embed_tokens", "lm_head", "down_proj"])}
    ref = PeftReference(model, dirs)
    ask = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2,
                         prompt_logprobs=2)
    # the prompt holds the last token id, which only the padded rank's rows cover
    prompt = [*random_prompt(6, seed=662), 49152, 7]
    with Engine(model, tensor_parallel_size=2, **OPTIONS) as engine:
        engine.add_adapter("v", dirs["v"])
        outs = engine.generate([prompt, prompt], adapters=["v", None], sampling_params=ask,
                               progress=False)
    for o in outs:
        check_output(o, scored(ref, o), k=2, prompt_k=2)
    full = prompt + outs[0].token_ids
    assert (ref.logprobs("v", full) - ref.logprobs(None, full)).abs().max() > 1e-2
