"""DoRA adapters (PEFT ``use_dora=True``) served unmerged, batched with plain LoRA adapters and
base-model requests, against PEFT on the same weights.

Random DoRA adapters (``init_lora_weights=False``, magnitudes then perturbed so that DoRA's
output scale is not 1) of ranks 1, 8 and 32 on different modules, on a tiny Llama (no biases)
and a tiny Qwen2 (q/k/v biases, which DoRA's rescaling must leave out). PEFT refuses
``adapter_names`` batches with DoRA, so the reference is one ``PeftModel`` holding every adapter,
switched with ``set_adapter`` per reference call.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file
from support import (
    OracleSampler,
    PeftOracle,
    assert_kv_released,
    drive,
    random_prompt,
    save_random_adapter,
    save_random_dora_adapter,
    save_random_qwen2,
)

from pagedlora import AdapterError, Engine, SamplingParams
from pagedlora.lora_adapter import TARGET_MODULES

ALL = list(TARGET_MODULES)  # the seven decoder projections
# model -> adapter name -> (is DoRA, save options)
ADAPTERS = {
    "llama": {
        "dora1": (True, dict(r=1, target_modules=["q_proj", "v_proj"], seed=201)),
        "dora8": (True, dict(r=8, target_modules=["o_proj", "gate_proj", "down_proj"],
                             seed=202)),
        "dora32": (True, dict(r=32, target_modules=ALL, seed=203)),
        "lora4": (False, dict(r=4, target_modules=ALL, seed=204)),
        "lora16": (False, dict(r=16, target_modules=["k_proj", "up_proj"], seed=205)),
    },
    "qwen2": {  # DoRA on the projections with biases, and beside them
        "dora8": (True, dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             seed=211)),
        "dora1": (True, dict(r=1, target_modules=["v_proj", "up_proj"], seed=212)),
        "dora32": (True, dict(r=32, target_modules=["k_proj", "down_proj"], seed=213)),
        "lora4": (False, dict(r=4, target_modules=["q_proj", "v_proj", "gate_proj"],
                              seed=214)),
    },
}
PROMPTS = [random_prompt(n, seed=300 + n) for n in (5, 12, 19, 27)]
GREEDY16 = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tmp_path_factory):
    """``model name -> (model name, model dir, adapter dirs, oracle)``, each built once."""
    cache = {}

    def build(model: str):
        if model not in cache:
            root = tmp_path_factory.mktemp(f"dora-{model}")
            model_dir = tiny_llama_dir if model == "llama" else save_random_qwen2(root / "m")
            dirs = {}
            for name, (dora, options) in ADAPTERS[model].items():
                save = save_random_dora_adapter if dora else save_random_adapter
                dirs[name] = save(model_dir, root / name, **options)
            cache[model] = model, model_dir, dirs, PeftOracle(model_dir, dirs)
        return cache[model]
    return build


@pytest.fixture(params=list(ADAPTERS))
def setup(request, built):
    """Each base model in turn."""
    return built(request.param)


@pytest.fixture
def llama(built):
    """The tiny Llama (for what does not depend on the model)."""
    return built("llama")


def make_engine(model_dir, dirs: dict, **options) -> Engine:
    options = {"pool_gb": 0.05, "max_lora_rank": 32, "max_loras": max(1, len(dirs)),
               **options}
    engine = Engine(model_dir, sampler=OracleSampler(), **options)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    return engine


def test_dora_adapters_are_dora_and_change_the_logits(setup):
    """Each adapter is what the test means (DoRA with output scales away from 1), and changes
    the logits far beyond the tolerance, so the comparisons below can fail."""
    name, model_dir, dirs, oracle = setup
    engine = make_engine(model_dir, dirs)
    base = oracle.logits(None, PROMPTS[1])
    for adapter, (dora, _) in ADAPTERS[name].items():
        key = engine.adapters.key_of(adapter)
        assert engine.adapters.is_dora(key) == dora, adapter
        delta = (oracle.logits(adapter, PROMPTS[1]) - base).abs().max().item()
        assert delta > 100 * 1e-4, f"{adapter!r} barely changes the logits ({delta:.3g})"
    magnitudes = [t for k, t in load_file(dirs["dora8"] / "adapter_model.safetensors").items()
                  if "lora_magnitude_vector" in k]
    assert magnitudes and all(t.dim() == 1 for t in magnitudes)


def test_dora_lora_and_base_in_one_batch_match_peft(setup):
    """DoRA adapters of ranks 1, 8 and 32, plain LoRA adapters and base requests in the same
    steps (first all prefills together, then later arrivals prefilled beside decodes): every
    logits row within 1e-4 of PEFT's; then 16 greedy tokens of each equal PEFT's."""
    name, model_dir, dirs, oracle = setup
    engine = make_engine(model_dir, dirs, block_size=8)
    names = [None, *ADAPTERS[name]]
    first = [(f"{a}-0", PROMPTS[i % 4], a) for i, a in enumerate(names)]
    late = [(f"{a}-late", PROMPTS[(i + 1) % 4], a) for i, a in enumerate(names[::-1][:3])]
    d = drive(engine, {0: first, 2: late}, oracle.logits, max_tokens=4)
    assert d.num_compared == 4 * (len(first) + len(late))
    assert {a for _, a, _, _ in d.steps[0]} == set(names)  # one heterogeneous step
    assert d.mixed_steps(), d.steps
    prompts = [PROMPTS[i % 4] for i in range(len(names))]
    outs = engine.generate(prompts, adapters=names, sampling_params=GREEDY16, progress=False)
    for adapter, prompt, out in zip(names, prompts, outs, strict=True):
        assert out.token_ids == oracle.greedy(adapter, prompt), f"adapter {adapter!r}"
    assert_kv_released(engine)


def test_dora_after_eviction_reloads_from_host_and_from_spill_file(llama, tmp_path):
    """The DoRA scales move through the tiers with A and B: evicted from the pool and copied
    back from host memory, then (``max_cpu_loras=0``) read back from a spill file that holds
    them, hash-checked; a spill file whose DoRA scale was altered is refused and the source
    re-read. Tokens equal PEFT's after each reload."""
    _, model_dir, dirs, oracle = llama
    prompt = PROMPTS[2]

    def run(engine, adapter="dora32") -> list[int]:
        out = engine.generate([prompt], adapters=adapter, sampling_params=GREEDY16,
                              progress=False)[0]
        engine.adapters.evict_unpinned(engine.pool.num_pages)  # leave the pool
        return out.token_ids

    want = oracle.greedy("dora32", prompt)
    host = make_engine(model_dir, {"dora32": dirs["dora32"]})
    assert run(host) == want and run(host) == want
    stats = host.stats()["adapters"]["dora32"]
    assert stats["loads_from_host"] == 2 and stats["loads_from_source"] == 1
    assert stats["evictions"] >= 1 and stats["tier"] == "host"

    spill = make_engine(model_dir, {"dora32": dirs["dora32"]}, max_cpu_loras=0,
                        spill_dir=tmp_path / "spill")
    assert run(spill) == want
    key = spill.adapters.key_of("dora32")
    assert spill.adapters.tier(key) == "disk"
    spilled = load_file(spill.adapters.spill.file_of(key))
    scales = {k: t for k, t in spilled.items() if k.endswith(".dora_scale")}
    assert len(scales) == 2 * len(ALL)  # one per DoRA module, next to lora_A and lora_B_t
    assert run(spill) == want
    stats = spill.stats()["adapters"]["dora32"]
    assert stats["loads_from_disk"] == 1 and stats["loads_from_source"] == 1
    # A spill file with one DoRA scale changed no longer hashes to the key: refused.
    first = sorted(scales)[0]
    spilled[first] = spilled[first] * 1.01
    save_file(spilled, spill.adapters.spill.file_of(key), metadata={"key": key})
    assert run(spill) == want
    stats = spill.stats()["adapters"]["dora32"]
    assert stats["loads_from_disk"] == 1 and stats["loads_from_source"] == 2


def test_content_key_covers_the_magnitude(llama, tmp_path):
    """Two DoRA adapters with the same A and B but another magnitude are two contents (two
    keys, their own pages), and their outputs differ as PEFT's do."""
    _, model_dir, dirs, oracle = llama
    tensors = load_file(dirs["dora8"] / "adapter_model.safetensors")
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "adapter_config.json").write_text(
        (dirs["dora8"] / "adapter_config.json").read_text())
    magnitude = next(k for k in tensors if "lora_magnitude_vector" in k)
    tensors[magnitude] = tensors[magnitude] * 1.5
    save_file(tensors, twin / "adapter_model.safetensors")
    engine = make_engine(model_dir, {"dora8": dirs["dora8"], "twin": twin})
    keys = {engine.adapters.key_of(n) for n in ("dora8", "twin")}
    assert len(keys) == 2
    outs = engine.generate([PROMPTS[0]] * 2, adapters=["dora8", "twin"],
                           sampling_params=GREEDY16, progress=False)
    assert len({tuple(o.token_ids) for o in outs}) == 2
    assert outs[0].token_ids == oracle.greedy("dora8", PROMPTS[0])
    placed = [engine.adapters.resident(k) for k in keys]
    assert not placed[0].overlaps(placed[1])


def test_dora_pages_hold_one_scale_row_per_module(llama):
    """The pool holds each DoRA module's output scale as one more row of its lora_B^T width:
    the used elements are A, B and out_features per module."""
    _, model_dir, dirs, _ = llama
    engine = make_engine(model_dir, {"dora8": dirs["dora8"]})
    engine.generate([PROMPTS[0]], adapters="dora8",
                    sampling_params=SamplingParams(max_tokens=1), progress=False)
    resident = engine.adapters.resident(engine.adapters.key_of("dora8"))
    weights = load_file(dirs["dora8"] / "adapter_model.safetensors")
    assert resident.used_elements == sum(t.numel() for t in weights.values())
    for m in resident.modules.values():  # one row (in pieces where its width leaves slack)
        assert m.dora is not None and m.dora.pages.shape[0] == 1


def test_dora_files_that_do_not_add_up_are_refused(llama, tmp_path):
    """A magnitude vector without use_dora, use_dora without one, or one of the wrong shape:
    refused at registration, naming the adapter and module."""
    _, model_dir, dirs, _ = llama
    engine = make_engine(model_dir, {})
    tensors = load_file(dirs["dora1"] / "adapter_model.safetensors")
    config = (dirs["dora1"] / "adapter_config.json").read_text()

    def write(label: str, tensors: dict, config_text: str):
        path = tmp_path / label
        path.mkdir()
        (path / "adapter_config.json").write_text(config_text)
        save_file(tensors, path / "adapter_model.safetensors")
        return path

    plain = config.replace('"use_dora": true', '"use_dora": false')
    with pytest.raises(AdapterError, match="'a'.*lora_magnitude_vector without use_dora"):
        engine.add_adapter("a", write("a", tensors, plain))
    bare = {k: t for k, t in tensors.items() if "magnitude" not in k}
    with pytest.raises(AdapterError, match="'b'.*use_dora=True but no lora_magnitude_vector"):
        engine.add_adapter("b", write("b", bare, config))
    wrong = {k: (t[:-1] if "magnitude" in k else t) for k, t in tensors.items()}
    with pytest.raises(AdapterError, match=r"'c', layer 0 q_proj: lora_magnitude_vector is "
                                           r"\(63,\)"):
        engine.add_adapter("c", write("c", wrong, config))
    assert engine.adapters.names == []


def test_static_slot_holds_a_dora_adapter_of_max_rank_everywhere(llama):
    """memory_layout="static" sizes a slot as max_lora_rank on every projection with each row
    width on pages of its own (``packed_pages``); a DoRA adapter of that rank everywhere has
    one more row per module, which the packer puts in the gaps the wider rows leave: it
    fits the slot (the static layout refuses only adapters whose rows do not, see
    test_lora_vocab), and a smaller one does too."""
    _, model_dir, dirs, _ = llama
    engine = Engine(model_dir, pool_gb=0.05, max_lora_rank=32, max_loras=1,
                    memory_layout="static")
    engine.add_adapter("dora32", dirs["dora32"])
    key = engine.adapters.key_of("dora32")
    assert engine.adapters.footprint(key) == engine.pool.allocator.slot_pages
    engine.add_adapter("dora8", dirs["dora8"])  # a smaller one fits
