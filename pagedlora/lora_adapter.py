"""LoraAdapter: a PEFT LoRA (or DoRA) directory read, validated against the base model, and
hashed."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file

from pagedlora.errors import AdapterError, UnsupportedAdapterError

# The projections of a Llama-family decoder layer that LoRA may target, in a fixed order.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The vocabulary modules LoRA may target; they belong to no decoder layer, and their
# ``(layer, module)`` keys take the layer index VOCAB_LAYER.
VOCAB_MODULES = ("embed_tokens", "lm_head")
VOCAB_LAYER = -1
LORA_MODULES = TARGET_MODULES + VOCAB_MODULES
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# PEFT saves "base_model.model." + the module path in the base model + ".lora_A.weight"
# (".lora_B.weight"; DoRA adds ".lora_magnitude_vector", older PEFT with ".weight"; and
# ".lora_embedding_A" for an embedding).
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                  r"\.(?:lora_([AB])\.weight|lora_magnitude_(vector)(?:\.weight)?)$")
_VOCAB_KEY = re.compile(r"^base_model\.model\.(?:model\.(embed_tokens)\.lora_embedding_([AB])"
                        r"|(lm_head)\.lora_([AB])\.weight)$")
# PEFT (save_embedding_layers="auto") also saves the base model's own embedding and output
# weights next to a LoRA on them; loading the adapter puts them back into the base model.
_BASE_VOCAB_KEY = re.compile(r"^base_model\.model\.(?:model\.(embed_tokens)|(lm_head))"
                             r"(?:\.base_layer)?\.weight$")
_MODULE_PATH = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# LoraConfig fields (PEFT 0.21) whose truthy values change the forward pass (aLoRA, QA-LoRA,
# layer replication, BD-LoRA, Arrow, KaSA, VeLoRA, MonteCLoRA, trainable tokens, LoRA on
# parameters): served as plain LoRA they would be silently wrong, so they are refused.
_FORWARD_CHANGING_OPTIONS = (
    "alora_invocation_tokens", "use_qalora", "layer_replication", "use_bdlora", "arrow_config",
    "kasa_config", "velora_config", "monteclora_config", "trainable_token_indices",
    "target_parameters")
_PEFT_DEFAULT_ALPHA = 8  # LoraConfig().lora_alpha, used when a config omits lora_alpha

__all__ = ["LORA_MODULES", "TARGET_MODULES", "VOCAB_LAYER", "VOCAB_MODULES", "AdapterError",
           "AdapterWeights", "BaseVocab", "BaseWeight", "LoraAdapter", "ModuleSpec",
           "ModuleWeights", "UnsupportedAdapterError", "content_key", "read_lora_adapter"]

BaseWeight = Callable[[int, str], torch.Tensor]
"""``(layer, module) -> [out_features, in_features]``: a base projection's weight (DoRA's weight
norm needs it)."""


@dataclass(frozen=True)
class BaseVocab:
    """The base model's vocabulary weights, as an adapter reader needs them.

    Attributes:
        embed_tokens: ``[vocab_size, hidden]`` the input embeddings.
        lm_head: ``[vocab_size, hidden]`` the output projection (``embed_tokens`` itself when
            tied).
        tied: whether the model ties them (``tie_word_embeddings``, SmolLM2); PEFT's
            ``ensure_weight_tying`` then ties an adapter's lm_head LoRA to its embed_tokens
            LoRA.
    """

    embed_tokens: torch.Tensor
    lm_head: torch.Tensor
    tied: bool


@dataclass(frozen=True)
class ModuleSpec:
    """What the store needs to know of one module's LoRA without holding its weights.

    Attributes:
        rank: r, the number of rank rows of lora_A and of lora_B^T.
        scale: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023).
        dora: whether the module is DoRA (weight-decomposed: a magnitude rescales the output).
    """

    rank: int
    scale: float
    dora: bool = False


@dataclass(frozen=True)
class ModuleWeights:
    """LoRA weights of one target module of one layer, in the engine's dtype.

    Attributes:
        a: ``[r, in_features]``, lora_A.
        b_t: ``[r, out_features]``, lora_B transposed so that both are stored as rank rows.
        dora: for a DoRA module, ``[out_features]`` ``m / ||W + scale * B A||`` (see
            :func:`dora_scale`), applied to the output; None for plain LoRA.
    """

    a: torch.Tensor
    b_t: torch.Tensor
    dora: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors."""
        return self.a.nbytes + self.b_t.nbytes + (0 if self.dora is None else self.dora.nbytes)


AdapterWeights = dict[tuple[int, str], ModuleWeights]
"""``(layer, module) -> ModuleWeights``: one adapter's weights in host memory."""


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter's description; its weights live apart (see AdapterStore).

    Attributes:
        name: the name it was added under.
        path: its PEFT directory (the source the weights are re-read from).
        key: xxhash (XXH3-128, hex) of its content (module names, scales, dtype, shapes and
            weights in the engine's dtype, DoRA's output scales): the identity that pages and
            caches are keyed by, so re-adding a name with new weights never reuses stale state
            and two names with the same weights share it.
        modules: ``(layer, module) -> ModuleSpec``.
        num_bytes: bytes of its weights in host memory (engine dtype).
    """

    name: str
    path: Path
    key: str
    modules: dict[tuple[int, str], ModuleSpec]
    num_bytes: int

    @property
    def max_rank(self) -> int:
        """Largest rank over the adapter's modules (rank_pattern may vary it)."""
        return max(m.rank for m in self.modules.values())

    @property
    def is_dora(self) -> bool:
        """Whether it is a DoRA adapter (``use_dora``)."""
        return any(m.dora for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        """Modules the adapter targets (in at least one layer), in LORA_MODULES order."""
        return [t for t in LORA_MODULES if any(m == t for _, m in self.modules)]


def read_lora_adapter(name: str, path: str | Path, *, num_layers: int,
                      module_shapes: dict[str, tuple[int, int]], max_lora_rank: int,
                      dtype: torch.dtype, base_vocab: BaseVocab | None = None,
                      base_weight: BaseWeight | None = None
                      ) -> tuple[LoraAdapter, AdapterWeights]:
    """Reads, validates and hashes a PEFT LoRA directory (plain LoRA or DoRA).

    A DoRA adapter (``use_dora``; Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
    Adaptation") gets, per module, the output scale ``m / ||W + scale * B A||`` computed here
    once from the base weight (:func:`dora_scale`), stored and hashed with its A and B.

    Every check runs here, on every read (registration reads once to hash, a reload from the
    source reads again), so an adapter that registered is one that loads.

    LoRA on the vocabulary modules follows PEFT exactly: on ``embed_tokens``
    (``lora_embedding_A [r, vocab_size]``, ``lora_embedding_B [hidden, r]``) the delta of token
    t is ``scale * A[:, t] @ B^T``; on ``lm_head`` it is a Linear's LoRA on the logits, also
    when the base ties lm_head to the embeddings (PEFT then wraps the tied output layer on its
    own, leaving the lookup alone). With ``ensure_weight_tying`` on a tied base, PEFT ties the
    lm_head LoRA to the embedding's (lm_head ``lora_A = lora_embedding_B^T``, ``lora_B =
    lora_embedding_A^T``), whether or not the file holds lm_head weights; so it is derived
    here, and lm_head weights in the file must equal it. The base model's own embedding or
    output weights that PEFT saves beside such a LoRA (``save_embedding_layers``) are loaded
    back into the base model by PEFT, so they must equal the base model's (up to bfloat16
    rounding): a resized or retrained vocabulary is refused, never silently replaced.

    Args:
        name: the adapter's name (used in error messages).
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
            ``adapter_model.bin``, read with ``torch.load(weights_only=True)``).
        num_layers: decoder layers of the base model.
        module_shapes: ``module -> (in_features, out_features)`` of the base model (the
            vocabulary modules' too, for adapters on them: ``embed_tokens`` is
            ``(vocab_size, hidden)``, ``lm_head`` ``(hidden, vocab_size)``).
        max_lora_rank: largest rank accepted.
        dtype: dtype the weights are converted to (and hashed in).
        base_vocab: the base model's vocabulary weights (checks of saved copies, weight tying);
            None refuses adapters that need them.
        base_weight: the base projections' weights; needed for DoRA adapters only.
    Returns:
        ``(adapter, weights)``; vocabulary modules are keyed ``(VOCAB_LAYER, module)``.
    Raises:
        AdapterError: missing directory or files, unreadable config or weights, peft_type not
            LORA, a non-numeric r or lora_alpha, a key that is not a Llama decoder projection
            or vocabulary module (e.g. a vision-language model's ``language_model`` paths), a
            target the model lacks, a shape that does not fit the model, rank above
            ``max_lora_rank``, a weight dtype other than float16/bfloat16/float32/float64,
            NaN/Inf weights (also after conversion to ``dtype``), no LoRA module at all,
            saved base embedding or output weights that differ from the base model's, lm_head
            weights that contradict ``ensure_weight_tying``; for DoRA a module without its
            magnitude vector or with one of another shape, a zero weight norm; a magnitude
            vector without ``use_dora``.
        UnsupportedAdapterError: bias other than "none", modules_to_save, fan_in_fan_out,
            lora_bias, DoRA on embed_tokens or lm_head, and the options that change the
            forward pass (aLoRA, QA-LoRA, layer_replication, BD-LoRA, Arrow, KaSA, VeLoRA,
            MonteCLoRA, trainable_token_indices, target_parameters); a vocabulary LoRA without
            ``module_shapes`` or ``base_vocab`` for it.
    """
    path = Path(path)
    config = _read_config(name, path)
    tensors = _read_weights(name, path)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            _vocab_weight(name, key, tensor, pairs, module_shapes, base_vocab)
            continue
        layer, parent, module = int(match[1]), match[2], match[3]
        if module not in module_shapes or _PARENT.get(module) != parent:
            raise AdapterError(f"adapter {name!r}: target module {parent}.{module} of layer "
                               f"{layer} is not in the model (it has "
                               f"{[m for m in module_shapes if m in _PARENT]})")
        if layer >= num_layers:
            raise AdapterError(f"adapter {name!r}: layer {layer} ({module}) is beyond the "
                               f"model's {num_layers} layers")
        pairs.setdefault((layer, module), {})[match[4] or "m"] = tensor
    if not pairs:
        raise AdapterError(f"adapter {name!r}: no LoRA weights in {path}")
    use_dora = bool(config.get("use_dora"))
    if use_dora and base_weight is None:
        raise ValueError(f"adapter {name!r} is a DoRA adapter: base_weight is needed")
    specs, weights = {}, {}
    for (layer, module), pair in sorted(pairs.items()):
        where = _where(name, layer, module)
        magnitude = pair.pop("m", None)
        if (magnitude is None) == use_dora:
            raise AdapterError(f"{where}: lora_magnitude_vector without use_dora=True" if
                               magnitude is not None else f"{where}: use_dora=True but no "
                               f"lora_magnitude_vector")
        spec, w = _module_weights(name, config, layer, module, pair, module_shapes[module],
                                  max_lora_rank, dtype)
        if use_dora:
            spec = ModuleSpec(spec.rank, spec.scale, dora=True)
            w = ModuleWeights(w.a, w.b_t, _dora_module(where, magnitude, w, spec.scale,
                                                       base_weight(layer, module), dtype))
        specs[(layer, module)], weights[(layer, module)] = spec, w
    if config.get("ensure_weight_tying") and base_vocab is not None and base_vocab.tied:
        _tie_lm_head(name, config, specs, weights)
    _check_finite(name, weights, dtype)
    num_bytes = sum(w.nbytes for w in weights.values())
    adapter = LoraAdapter(name=name, path=path, key=content_key(specs, weights), modules=specs,
                          num_bytes=num_bytes)
    return adapter, weights


def _read_config(name: str, path: Path) -> dict:
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    config_path = path / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {config_path}: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {config_path} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type is {peft_type!r}, only LORA is served")
    unsupported = []
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if config.get("modules_to_save"):
        unsupported.append(f"modules_to_save={config['modules_to_save']!r}")
    if config.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out=True")
    if config.get("lora_bias"):
        unsupported.append("lora_bias=True")
    # LoraConfig options that change the forward pass away from plain LoRA (PEFT 0.21)
    for option in _FORWARD_CHANGING_OPTIONS:
        if config.get(option):
            unsupported.append(f"{option}={config[option]!r}")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"adapter {name!r}: {config_path} has target_modules="
                           f"{config.get('target_modules')!r}, expected a string or strings")
    vocab_targets = [t for t in targets if any(v in t for v in VOCAB_MODULES)]
    if config.get("use_dora") and vocab_targets:
        unsupported.append(f"target_modules {vocab_targets} (DoRA on embed_tokens or "
                           f"lm_head)")
    for option in ("r", "lora_alpha"):
        value = config.get(option, 1)
        if not _positive_number(value):
            raise AdapterError(f"adapter {name!r}: {config_path} has {option}={value!r}, "
                               f"expected a positive number")
    for option in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(option) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"adapter {name!r}: {config_path} has {option}={patterns!r}, "
                               f"expected an object of pattern: number")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterError(f"adapter {name!r}: {option} key {pattern!r} is not a "
                                   f"regular expression: {e}") from e
            if not _positive_number(value):
                raise AdapterError(f"adapter {name!r}: {option}[{pattern!r}]={value!r}, "
                                   f"expected a positive number")
    if unsupported:
        raise UnsupportedAdapterError(
            f"adapter {name!r} uses features pagedlora does not support: "
            + "; ".join(unsupported))
    return config


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    st, bin_ = path / "adapter_model.safetensors", path / "adapter_model.bin"
    try:
        if st.exists():
            tensors = load_file(st)
        elif bin_.exists():
            tensors = torch.load(bin_, map_location="cpu", weights_only=True)
        else:
            raise AdapterError(f"adapter {name!r}: neither adapter_model.safetensors nor "
                               f"adapter_model.bin in {path}")
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user error
        raise AdapterError(f"adapter {name!r}: cannot read weights in {path}: {e}") from e
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise AdapterError(f"adapter {name!r}: the weights file in {path} is not a mapping of "
                           f"names to tensors (got {type(tensors).__name__})")
    return tensors


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path's dotted suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _where(name: str, layer: int, module: str) -> str:
    return f"adapter {name!r}, " + (module if layer == VOCAB_LAYER else f"layer {layer} {module}")


def _vocab_weight(name: str, key: str, tensor: torch.Tensor,
                  pairs: dict[tuple[int, str], dict[str, torch.Tensor]],
                  module_shapes: dict[str, tuple[int, int]], base_vocab: BaseVocab | None
                  ) -> None:
    """Files a weight that is not a decoder projection's: a vocabulary module's LoRA half goes
    into ``pairs``; a saved copy of the base model's vocabulary weights is checked.

    Raises:
        AdapterError: any other key, or a saved copy that differs from the base model's.
        UnsupportedAdapterError: the model's vocabulary shapes or weights are not given.
    """
    lora, base = _VOCAB_KEY.match(key), _BASE_VOCAB_KEY.match(key)
    if lora is None and base is None:
        raise AdapterError(
            f"adapter {name!r}: weight {key!r} is not a LoRA weight of a Llama decoder "
            f"projection, embed_tokens or lm_head (expected base_model.model.model.layers.<i>."
            f"<self_attn|mlp>.<module>.lora_<A|B>.weight; was it trained for another "
            f"architecture?)")
    module = (lora[1] or lora[3]) if lora else (base[1] or base[2])
    if module not in module_shapes or base_vocab is None:
        raise UnsupportedAdapterError(
            f"adapter {name!r}: {key} is LoRA on {module}, which this reader was not given the "
            f"model's vocabulary shapes and weights for")
    if lora is not None:
        pairs.setdefault((VOCAB_LAYER, module), {})[lora[2] or lora[4]] = tensor
        return
    ours = getattr(base_vocab, module)
    saved = tensor.to(ours.device, torch.float32) if tensor.dtype.is_floating_point else None
    # The same weights, perhaps trained in another precision than served: equal up to bfloat16
    # rounding (a relative 2**-8; 2**-7 allows one rounding on each side).
    if saved is None or saved.shape != ours.shape or not torch.allclose(
            saved, ours.float(), rtol=2**-7, atol=1e-6):
        what = (f"shape {tuple(tensor.shape)}, the model's {tuple(ours.shape)}"
                if saved is None or saved.shape != ours.shape else
                f"max |diff| {(saved - ours.float()).abs().max().item():.3g}")
        raise AdapterError(
            f"adapter {name!r}: {key} holds its own {module} weights, which differ from the "
            f"base model's ({what}); PEFT would load them into the base model (a resized or "
            f"retrained vocabulary), which pagedlora does not serve")


def _tie_lm_head(name: str, config: dict, specs: dict[tuple[int, str], ModuleSpec],
                 weights: AdapterWeights) -> None:
    """PEFT's ``ensure_weight_tying`` on a tied base: lm_head's LoRA is the embedding's,
    transposed (``lora_A = lora_embedding_B^T``, ``lora_B = lora_embedding_A^T``), scaled with
    lm_head's own r and alpha (``rank_pattern``/``alpha_pattern`` may name it).

    Raises:
        AdapterError: lm_head weights without embed_tokens ones, lm_head weights in the file
            that are not the tied ones, or a pattern rank for lm_head that is not the
            embedding's.
    """
    embed, head = (VOCAB_LAYER, "embed_tokens"), (VOCAB_LAYER, "lm_head")
    if embed not in weights:
        if head in weights:
            raise AdapterError(f"adapter {name!r}: ensure_weight_tying=True with lm_head LoRA "
                               f"weights but none for embed_tokens, which PEFT ties them to")
        return
    e = weights[embed]
    # copies: tensors sharing memory cannot be written to one safetensors file (the spill tier)
    tied = ModuleWeights(a=e.b_t.clone(), b_t=e.a.clone())
    if head in weights and not (torch.equal(weights[head].a, tied.a)
                                and torch.equal(weights[head].b_t, tied.b_t)):
        raise AdapterError(f"adapter {name!r}: ensure_weight_tying=True, but its lm_head LoRA "
                           f"weights are not embed_tokens' transposed, as PEFT ties them")
    r = e.a.shape[0]
    r_config = _pattern_value(config.get("rank_pattern") or {}, "lm_head", config.get("r", r))
    if r_config != r:
        raise AdapterError(f"adapter {name!r}: lm_head is tied to embed_tokens' rank {r} "
                           f"LoRA, but the config gives it rank {r_config}")
    specs[head] = ModuleSpec(rank=r, scale=_scale(config, "lm_head", r))
    weights[head] = tied


def _scale(config: dict, module_path: str, r: int) -> float:
    """PEFT's scaling of a module: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), alpha from
    ``alpha_pattern``."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module_path,
                           config.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
    return float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def _module_weights(name: str, config: dict, layer: int, module: str,
                    pair: dict[str, torch.Tensor], shape: tuple[int, int], max_lora_rank: int,
                    dtype: torch.dtype) -> tuple[ModuleSpec, ModuleWeights]:
    where = _where(name, layer, module)
    if set(pair) != {"A", "B"}:
        raise AdapterError(f"{where}: has lora_{''.join(pair)} but not both lora_A and lora_B")
    a, b = pair["A"], pair["B"]
    in_f, out_f = shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f \
            or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the "
            f"model's {in_f}->{out_f} projection (expected [r, {in_f}] and [{out_f}, r]; "
            f"was the adapter trained for another model?)")
    if a.dtype not in _WEIGHT_DTYPES or b.dtype not in _WEIGHT_DTYPES:
        raise AdapterError(f"{where}: weights have dtype {a.dtype}/{b.dtype}; supported: "
                           f"{', '.join(str(d) for d in _WEIGHT_DTYPES)}")
    r = a.shape[0]
    if r > max_lora_rank:
        raise AdapterError(f"{where}: rank {r} exceeds max_lora_rank={max_lora_rank}")
    module_path = (_MODULE_PATH[module] if layer == VOCAB_LAYER
                   else f"model.layers.{layer}.{_PARENT[module]}.{module}")
    r_config = _pattern_value(config.get("rank_pattern") or {}, module_path, config.get("r", r))
    if r_config != r:
        raise AdapterError(f"{where}: config says rank {r_config} but the weights have rank {r}")
    a, b_t = a.to(dtype).contiguous(), b.t().to(dtype).contiguous()
    return ModuleSpec(rank=r, scale=_scale(config, module_path, r)), ModuleWeights(a=a, b_t=b_t)


def _check_finite(name: str, weights: AdapterWeights, dtype: torch.dtype) -> None:
    """Raises AdapterError naming the first module with NaN or Inf. Checked in the engine's
    dtype (float32 weights beyond float16's range become Inf there).

    Fast path: float64 sums are finite exactly when every weight is (a NaN or Inf makes a sum
    NaN or Inf; finite float32 values cannot overflow a float64 sum). One sum per tensor, not
    over one concatenation: small reductions run on one thread, and a parallel one on a busy
    CPU cost 7 ms per 2 MB adapter (isfinite per tensor cost ~7 ms too; this ~1 ms)."""
    def tensors(w: ModuleWeights) -> tuple[torch.Tensor, ...]:
        return (w.a, w.b_t) if w.dora is None else (w.a, w.b_t, w.dora)
    sums = torch.stack([t.sum(dtype=torch.float64) for w in weights.values()
                        for t in tensors(w)])
    if torch.isfinite(sums.sum()):
        return
    for (layer, module), w in weights.items():
        if not all(torch.isfinite(t).all() for t in tensors(w)):
            raise AdapterError(f"{_where(name, layer, module)}: weights contain NaN or Inf "
                               f"(in {dtype})")


def content_key(modules: dict[tuple[int, str], ModuleSpec], weights: AdapterWeights) -> str:
    """XXH3-128 (hex) of an adapter's content: per module in sorted order, its name, scale,
    dtype and shape, then the bytes of lora_A and lora_B^T (and for DoRA a marker and the bytes
    of its output scale). Hashes the tensors' memory in place (the buffer protocol), without
    copies."""
    h = xxhash.xxh3_128()
    for (layer, module), spec in sorted(modules.items()):
        w = weights[(layer, module)]
        h.update(f"{layer}.{module}:{spec.scale!r}:{w.a.dtype}:{tuple(w.a.shape)}".encode())
        h.update(w.a.contiguous().view(torch.uint8).numpy())
        h.update(w.b_t.contiguous().view(torch.uint8).numpy())
        if spec.dora:
            h.update(b":dora:")
            h.update(w.dora.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def dora_scale(magnitude: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, scale: float,
               base: torch.Tensor) -> torch.Tensor:
    """DoRA's output scale of one projection: ``m / ||W + scale * B A||`` with the norm of each
    output row (``dim=1`` of the ``[out, in]`` weight: PEFT's "column-wise" norm in its
    transposed convention), as PEFT's ``DoraLinearLayer.get_weight_norm`` computes it; the norm
    is a constant (detached, DoRA section 4.3), so it is computed once. The forward is then
    ``y = g * (W x + scale * B A x) + bias`` for ``g`` this scale (PEFT's
    ``(g - 1) * (base - bias) + g * scale * lora`` added to ``base``).

    Args:
        magnitude: ``[out]`` DoRA's magnitude vector m.
        a: ``[r, in]`` lora_A. b_t: ``[r, out]`` lora_B^T.
        scale: the module's LoRA scaling.
        base: ``[out, in]`` the base projection's weight.
    Returns:
        ``[out]`` float32, on ``magnitude``'s device; computed in float32 on ``base``'s device.
    """
    device = base.device
    weight = base.float() + scale * (b_t.to(device).float().t() @ a.to(device).float())
    norm = torch.linalg.norm(weight, dim=1)
    return (magnitude.to(device).float() / norm).to(magnitude.device)


def _dora_module(where: str, magnitude: torch.Tensor, w: ModuleWeights, scale: float,
                 base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The module's DoRA output scale in ``dtype``, ``[out_features]``; AdapterError for a
    magnitude vector of the wrong shape or dtype, a zero weight norm."""
    out_f = w.b_t.shape[1]
    if magnitude.shape != (out_f,) or magnitude.dtype not in _WEIGHT_DTYPES:
        raise AdapterError(f"{where}: lora_magnitude_vector is {tuple(magnitude.shape)} "
                           f"{magnitude.dtype}; expected ({out_f},) of a float dtype")
    g = dora_scale(magnitude, w.a, w.b_t, scale, base)
    if not torch.isfinite(g).all():
        raise AdapterError(f"{where}: DoRA's weight norm ||W + scale * B A|| is 0 or the "
                           f"magnitude not finite")
    return g.to(dtype).contiguous()
