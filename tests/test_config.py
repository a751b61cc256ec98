"""EngineConfig validates itself and picks the dtype by device."""

import pytest

from pagedlora import EngineConfig


def test_dtype_defaults_by_device():
    assert EngineConfig().dtype == "float32"
    assert EngineConfig(device="cuda:1").dtype == "bfloat16"
    assert EngineConfig(device="cpu", dtype="float16").dtype == "float16"


@pytest.mark.parametrize("options, match", [
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"max_loras": True}, "max_loras"),
    ({"max_model_len": -5}, "max_model_len"), ({"seed": 1.5}, "seed"),
    ({"max_num_batched_tokens": 2.0}, "max_num_batched_tokens"),
    ({"max_cpu_loras": -1}, "max_cpu_loras"), ({"max_cpu_loras": True}, "max_cpu_loras"),
    ({"host_cache_gb": "1"}, "host_cache_gb"), ({"host_cache_gb": -0.5}, "host_cache_gb"),
    ({"spill_dir": 5}, "spill_dir"), ({"spill_dir": ""}, "spill_dir"),
    ({"memory_layout": "paged"}, "memory_layout"),
    ({"lora_shrink_in_base_after": -1}, "lora_shrink_in_base_after"),
    ({"lora_shrink_in_base_after": True}, "lora_shrink_in_base_after"),
])
def test_invalid_values_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**options)


def test_shrink_packing_waits_by_dtype():
    """The wait before lora_A rows are packed below the base weights is about the steps the
    packing costs: float32's reorder is the slower (docs/benchmarks.md, issue 19 stop 27)."""
    assert EngineConfig().lora_shrink_in_base_after == 64
    assert EngineConfig(dtype="bfloat16").lora_shrink_in_base_after == 16
    assert EngineConfig(lora_shrink_in_base_after=0).lora_shrink_in_base_after == 0


def test_from_options_rejects_unknown_names():
    with pytest.raises(TypeError, match=r"unknown Engine option\(s\) \['bogus'\]"):
        EngineConfig.from_options(1.0, bogus=1)
    assert EngineConfig.from_options(0.5, block_size=8).block_size == 8


def test_adapter_tier_options():
    config = EngineConfig(max_cpu_loras=0, host_cache_gb=0.5, spill_dir="/tmp/spill")
    assert config.max_cpu_loras == 0 and config.host_cache_gb == 0.5
    assert str(config.spill_dir) == "/tmp/spill" and hasattr(config.spill_dir, "is_dir")
    defaults = EngineConfig()
    assert defaults.max_cpu_loras is defaults.host_cache_gb is defaults.spill_dir is None
