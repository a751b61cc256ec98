"""Offline batch inference: JSONL requests in, JSONL results out, all in one Engine.generate call.

Each input line is a JSON object with

* ``"prompt"``: a string (or a list of token ids), or ``"messages"``: chat messages
  (``[{"role": "user", "content": "..."}]``, rendered with the model's chat template);
* ``"adapter"``: an adapter name, or null / absent for the base model;
* optionally the sampling fields ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
  ``stop``, ``stop_token_ids``, ``ignore_eos`` (see ``pagedlora.SamplingParams``; absent fields
  take its defaults: max_tokens=16, temperature=1.0).

Blank lines are skipped. Every other line is validated before the model is loaded; an invalid
line (bad JSON, unknown field, wrong type, unknown adapter, ...) is reported with its line number
and the script exits with status 2. The results are written in input order, one JSON object per
request line: ``{"prompt" | "messages", "adapter", "text", "token_ids", "finish_reason", "ttft",
"tpot", "error"}`` (``error`` is null unless ``finish_reason`` is "error", e.g. an empty prompt).
Progress goes to stderr.

Run it from the repository root, e.g. with the adapters of ``examples/train_adapters.py``::

    cat > /tmp/requests.jsonl <<'EOF'
    {"messages": [{"role": "user", "content": "Name a fruit."}], "adapter": "upper"}
    {"prompt": "The sky is", "adapter": null, "max_tokens": 8, "temperature": 0}
    EOF
    python examples/offline_batch.py /tmp/requests.jsonl --adapters-dir adapters
    python examples/offline_batch.py - --adapter upper=adapters/upper < /tmp/requests.jsonl \\
        > /tmp/out.jsonl
    python examples/offline_batch.py /tmp/requests.jsonl --model path/to/hf_dir --pool-gb 2 \\
        --adapter upper=adapters/upper --output results.jsonl
    python examples/offline_batch.py /tmp/requests.jsonl --adapters-dir adapters \\
        --dtype bfloat16 --max-model-len 4096 --max-num-seqs 128 --max-loras 16 --max-lora-rank 32

Every engine option of ``pagedlora serve`` is an option here too, spelled the same
(``--dtype``, ``--max-model-len``, ``--max-num-seqs``, ``--max-loras``, ``--max-lora-rank``,
``--policy``...; ``--help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                   "stop_token_ids", "ignore_eos")
FIELDS = ("prompt", "messages", "adapter", *SAMPLING_FIELDS)


class InputError(ValueError):
    """An invalid input line; the message says what is wrong with it."""


class CliError(Exception):
    """Ends the script with ``message`` on stderr (no traceback) and exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    key: str  # "prompt" or "messages": how the prompt was given (echoed in the result)
    prompt: object
    adapter: str | None
    params: object  # SamplingParams
    where: str = ""  # "FILE line N", for errors found once the model is loaded


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_error(name: str, value) -> str | None:
    """Why ``value`` cannot be the sampling field ``name`` (None when its JSON type fits)."""
    ok = {
        "max_tokens": _is_int(value),
        "top_k": _is_int(value),
        "seed": value is None or _is_int(value),
        "temperature": _is_int(value) or isinstance(value, float),
        "top_p": _is_int(value) or isinstance(value, float),
        "ignore_eos": isinstance(value, bool),
        "stop": isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(s, str) for s in value)),
        "stop_token_ids": isinstance(value, list) and all(_is_int(t) for t in value),
    }[name]
    if ok:
        return None
    expected = {"max_tokens": "an integer", "top_k": "an integer", "seed": "an integer or null",
                "temperature": "a number", "top_p": "a number", "ignore_eos": "true or false",
                "stop": "a string or a list of strings",
                "stop_token_ids": "a list of integers"}[name]
    return f'"{name}" must be {expected}, got {json.dumps(value)}'


def parse_line(text: str, adapter_names: set[str]) -> Job:
    """Validates one input line.

    Raises:
        InputError: naming what is wrong.
    """
    from pagedlora.sampling_params import SamplingParams  # no torch: validation stays fast

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(FIELDS)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise InputError('needs exactly one of "prompt" and "messages"')
    if "prompt" in obj:
        key, prompt = "prompt", obj["prompt"]
        if not (isinstance(prompt, str)
                or (isinstance(prompt, list) and all(_is_int(t) and t >= 0 for t in prompt))):
            raise InputError('"prompt" must be a string or a list of token ids')
    else:
        key, prompt = "messages", obj["messages"]
        if not isinstance(prompt, list) or not prompt:
            raise InputError('"messages" must be a non-empty list of '
                             '{"role": ..., "content": ...} objects')
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise InputError(f'"messages"[{i}] must be an object with string "role" and '
                                 f'"content", got {json.dumps(m)}')
    adapter = obj.get("adapter")
    if adapter is not None:
        if not isinstance(adapter, str):
            raise InputError(f'"adapter" must be a name or null, got {json.dumps(adapter)}')
        if adapter not in adapter_names:
            known = ", ".join(sorted(adapter_names)) or "none (use --adapter or --adapters-dir)"
            raise InputError(f"unknown adapter {adapter!r}; known adapters: {known}")
    fields = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
    for name, value in fields.items():
        problem = _type_error(name, value)
        if problem:
            raise InputError(problem)
    try:
        params = SamplingParams(**fields)
    except ValueError as e:
        raise InputError(str(e)) from None
    return Job(key=key, prompt=prompt, adapter=adapter, params=params)


def adapter_spec(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` from the command line."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Input lines: {\"prompt\": str} or {\"messages\": [...]}, \"adapter\": name or "
               "null, optional sampling fields. See the module docstring.")
    p.add_argument("input", help="JSONL file of requests, or - for stdin")
    p.add_argument("--model", default=None,
                   help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--pool-gb", type=float, default=1.0,
                   help="unified KV/adapter pool size in GiB (default: %(default)s)")
    p.add_argument("--adapter", type=adapter_spec, action="append", default=[],
                   metavar="NAME=PATH", help="add a PEFT LoRA directory as NAME (repeatable)")
    p.add_argument("--adapters-dir", type=Path, metavar="DIR",
                   help="add every subdirectory of DIR holding adapter_config.json, "
                        "under its folder name")
    p.add_argument("--output", "-o", default="-",
                   help="where the JSONL results go (default: stdout)")
    from pagedlora.cli import add_engine_options  # no torch: --help stays fast

    add_engine_options(p.add_argument_group("engine (pagedlora.EngineConfig, as pagedlora serve)"))
    return p.parse_args(argv)


def collect_adapters(args: argparse.Namespace) -> dict[str, Path]:
    """name -> PEFT directory, from --adapters-dir and then --adapter (which wins)."""
    adapters: dict[str, Path] = {}
    if args.adapters_dir is not None:
        if not args.adapters_dir.is_dir():
            raise CliError(f"--adapters-dir {args.adapters_dir} is not a directory")
        for d in sorted(args.adapters_dir.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "adapter_config.json").is_file():
                adapters[d.name] = d
    explicit: set[str] = set()
    for name, path in args.adapter:
        if name in explicit:
            raise CliError(f"--adapter {name} is given twice")
        explicit.add(name)
        adapters[name] = path
    return adapters


def read_jobs(source: str, adapter_names: set[str]) -> list[Job]:
    """Parses every non-blank input line; reports all invalid ones (then exits) at once."""
    label = "<stdin>" if source == "-" else source
    try:
        if source == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(source, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {label}: {e}") from None
    jobs, errors = [], []
    for lineno, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            job = parse_line(text, adapter_names)
            job.where = f"{label} line {lineno}"
            jobs.append(job)
        except InputError as e:
            errors.append(f"{label} line {lineno}: {e}")
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise CliError(f"{len(errors)} invalid input line(s):\n  " + "\n  ".join(shown))
    return jobs


def run(args: argparse.Namespace) -> None:
    from pagedlora.cli import engine_options
    from pagedlora.config import EngineConfig

    try:  # bad engine options are reported before the input is read or the model loaded
        EngineConfig.from_options(args.pool_gb, **engine_options(args))
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None
    adapters = collect_adapters(args)
    jobs = read_jobs(args.input, set(adapters))

    results = []
    if jobs:
        from pagedlora import AdapterError, Engine, UnsupportedAdapterError

        try:
            engine = Engine(args.model, pool_gb=args.pool_gb, **engine_options(args))
        except (FileNotFoundError, ValueError) as e:
            raise CliError(f"cannot load the model: {e}") from None
        for name, path in adapters.items():
            try:
                engine.add_adapter(name, path)
            except (AdapterError, UnsupportedAdapterError) as e:
                raise CliError(str(e)) from None
        outs = engine.generate([j.prompt for j in jobs], adapters=[j.adapter for j in jobs],
                               sampling_params=[j.params for j in jobs], progress=True)
        for job, out in zip(jobs, outs, strict=True):
            results.append({job.key: job.prompt, "adapter": job.adapter, "text": out.text,
                            "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                            "ttft": out.ttft, "tpot": out.tpot, "error": out.error})

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        try:
            Path(args.output).write_text(lines, encoding="utf-8")
        except OSError as e:
            raise CliError(f"cannot write {args.output}: {e}", code=1) from None


def main(argv: list[str] | None = None) -> int:
    """Runs the script; returns its exit status (0, or 2 for invalid input or arguments)."""
    args = parse_args(argv)
    try:
        run(args)
    except CliError as e:
        print(f"offline_batch.py: error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
