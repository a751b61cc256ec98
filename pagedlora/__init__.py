"""pagedlora: serve one base LLM with many LoRA adapters from one unified paged memory pool.

The public names are imported lazily (PEP 562), so ``import pagedlora.scheduler`` stays free of
torch and nothing heavy happens at import time.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterMix": "pagedlora.adapter_mix",
    "AdapterMixError": "pagedlora.errors",
    "Engine": "pagedlora.engine",
    "EngineConfig": "pagedlora.config",
    "SamplingParams": "pagedlora.sampling_params",
    "RequestOutput": "pagedlora.outputs",
    "StreamOutput": "pagedlora.outputs",
    "TokenLogprobs": "pagedlora.scheduler",
    "AdapterError": "pagedlora.errors",
    "AdapterUnavailableError": "pagedlora.errors",
    "EngineDeadError": "pagedlora.errors",
    "UnsupportedAdapterError": "pagedlora.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagedlora' has no attribute {name!r}")
