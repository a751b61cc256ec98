"""The ``pagedlora`` command (``python -m pagedlora``); ``pagedlora serve`` runs the HTTP server.

Every :class:`~pagedlora.EngineConfig` field but ``pool_gb`` is an option of ``serve``
(``max_num_seqs`` -> ``--max-num-seqs``), with the field's documentation as its help, so the
two never drift apart; :func:`add_engine_options` and :func:`engine_options` give other scripts
(``examples/offline_batch.py``) the same options with the same spelling.
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from pagedlora import __version__
from pagedlora.config import DTYPES, KERNEL_BACKENDS, MEMORY_LAYOUTS, POLICIES, EngineConfig

_CONVERTERS = {"int": int, "float": float, "str": str}
_CHOICES = {"dtype": DTYPES, "kernel_backend": KERNEL_BACKENDS, "memory_layout": MEMORY_LAYOUTS,
            "policy": POLICIES}
# What `pagedlora serve` imports beyond the base install: the "serve" extra
_SERVE_MODULES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic")


def main(argv: list[str] | None = None) -> int:
    """Runs ``pagedlora`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args.command_parser, args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pagedlora`` and its ``serve`` subcommand."""
    parser = argparse.ArgumentParser(prog="pagedlora", description="Serve one base LLM with "
                                     "many LoRA adapters from one unified paged memory pool.")
    parser.add_argument("--version", action="version", version=f"pagedlora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the OpenAI- and SageMaker-compatible HTTP server",
        description="Serve base models and their LoRA adapters over HTTP: OpenAI's "
        "/v1/completions, /v1/chat/completions, /v1/models, vLLM's /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter, SageMaker's /invocations and /ping, /health, /metrics.")
    serve.set_defaults(run=_serve, command_parser=serve)
    what = serve.add_argument_group("what to serve")
    what.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                      help="a base model (HF directory or .gguf file) served as NAME; repeat "
                      "for several, each with its own engine. Default: the embedded "
                      "SmolLM2-135M-Instruct")
    what.add_argument("--adapter", action="append", default=[], metavar="[MODEL:]NAME=PATH",
                      help="a PEFT LoRA directory served as NAME on base model MODEL (needed "
                      "when several are served); repeat for more")
    what.add_argument("--adapters-dir", action="append", default=[], metavar="[MODEL=]DIR",
                      help="a folder (or .tar.gz) of PEFT directories, each served under its "
                      "folder's name")
    http = serve.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1: this machine only)")
    http.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    http.add_argument("--max-queue", type=int, default=256, metavar="N",
                      help="most requests per base model waiting for their first token; more "
                      "get 503 with Retry-After (default: %(default)s)")
    http.add_argument("--max-body-mb", type=float, default=4.0, metavar="MB",
                      help="largest request body in MiB; larger gets 413 (default: %(default)s)")
    http.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                      help="on SIGTERM, seconds running requests may take to finish before "
                      "they are aborted (default: %(default)s)")
    http.add_argument("--log-level", default="info",
                      choices=["debug", "info", "warning", "error"])
    engine = serve.add_argument_group("engine (pagedlora.EngineConfig, for every base model)")
    engine.add_argument("--pool-gb", type=float, default=1.0, metavar="G",
                        help="GiB of unified pool in all, split evenly between the base models "
                        "(default: %(default)s)")
    add_engine_options(engine)
    return parser


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``pagedlora serve``: checks what it can before loading models (arguments, paths, the
    port, the serve extra), printing the subcommand's usage for a bad argument; 1 when a model
    or adapter cannot load."""
    try:
        config = server_config(args)
        _check_paths(config)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        from pagedlora.server.app import build_app, run
    except ModuleNotFoundError as e:
        if e.name not in _SERVE_MODULES:
            raise
        print(f"pagedlora serve: error: the HTTP server needs the 'serve' extra ({e.name} is "
              f"missing): pip install 'pagedlora[serve]' (in a clone: pip install -e "
              f"'.[serve]')", file=sys.stderr)
        return 1
    problem = _port_problem(config.host, config.port)
    if problem:
        parser.error(problem)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = build_app(config)
    except (OSError, ValueError, NotImplementedError) as e:  # a model or adapter cannot load
        print(f"pagedlora serve: error: {e}", file=sys.stderr)
        return 1
    run(app, log_level=args.log_level)
    return 0


def _check_paths(config) -> None:
    """Raises FileNotFoundError naming the option whose model or adapter path is missing, so
    that it is reported before minutes of model loading."""
    for name, path in config.models.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--model {name}={path}: no such file or directory")
    for a in config.adapters:
        if not a.path.exists():
            option = f"--adapter {a.name}={a.path}" if a.name else f"--adapters-dir {a.path}"
            hint = " (make demo trains the demo's adapters into ./adapters)" \
                if a.name is None and a.path.name == "adapters" else ""
            raise FileNotFoundError(f"{option}: no such file or directory{hint}")


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, not an address of this machine), or
    None. Bound and released at once, as uvicorn binds it later (SO_REUSEADDR as it does)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        reason = e.strerror or str(e)
        return f"cannot listen on {host}:{port}: {reason} (--host, --port)"
    return None


def server_config(args: argparse.Namespace):
    """The :class:`~pagedlora.server.config.ServerConfig` of parsed ``serve`` arguments.

    Raises:
        ValueError: a malformed ``NAME=PATH``, a name given twice, or as ServerConfig.
        TypeError: as ServerConfig.
    """
    from pagedlora.server.config import AdapterSource, ServerConfig

    models = dict(_split(m, "--model", "NAME=PATH") for m in args.model)
    if len(models) < len(args.model):
        raise ValueError("--model: the same NAME is given twice")
    adapters = []
    for text in args.adapter:
        left, path = _split(text, "--adapter", "[MODEL:]NAME=PATH")
        model, _, name = left.rpartition(":")
        adapters.append(AdapterSource(model or None, Path(path), name))
    for text in args.adapters_dir:
        model, _, path = text.partition("=") if "=" in text else ("", "", text)
        adapters.append(AdapterSource(model or None, Path(path)))
    options = engine_options(args)
    return ServerConfig(models={name: Path(path) for name, path in models.items()},
                        adapters=tuple(adapters), host=args.host, port=args.port,
                        pool_gb=args.pool_gb, max_queue=args.max_queue,
                        max_body_bytes=int(args.max_body_mb * 2**20),
                        shutdown_timeout_s=args.shutdown_timeout, engine_options=options)


def _split(text: str, option: str, form: str) -> tuple[str, str]:
    """``"LEFT=RIGHT"`` -> ``(LEFT, RIGHT)`` at the first ``=`` (names hold none)."""
    left, found, right = text.partition("=")
    if not found or not left or not right:
        raise ValueError(f"{option} {text!r}: expected {form}")
    return left, right


def _engine_fields():
    return [f for f in fields(EngineConfig) if f.name != "pool_gb"]


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields given on the command line (as added by
    :func:`add_engine_options`), for ``Engine(model, pool_gb, **options)``."""
    return {f.name: getattr(args, f.name) for f in _engine_fields()
            if getattr(args, f.name) is not None}


def add_engine_options(group: argparse._ArgumentGroup) -> None:
    """Adds one option per EngineConfig field but ``pool_gb`` to ``group`` (a parser or an
    argument group), help from the field's docs; not given (None) keeps the field's default."""
    docs = _attribute_docs(EngineConfig.__doc__ or "")
    for f in _engine_fields():
        kind = str(f.type).replace(" | None", "").strip()
        doc = _for_the_command_line(docs.get(f.name, ""))
        if "default" not in doc and f.default not in (MISSING, None):
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            doc += f" (default: {shown})"
        flag, help_text = "--" + f.name.replace("_", "-"), doc.replace("%", "%%")
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif f.name in _CHOICES:
            group.add_argument(flag, choices=_CHOICES[f.name], default=None, help=help_text)
        else:
            group.add_argument(flag, type=_CONVERTERS.get(kind, str), default=None,
                               metavar=kind.upper() if kind in _CONVERTERS else "PATH",
                               help=help_text)


def _for_the_command_line(doc: str) -> str:
    """A field's docstring as option help: no reST quotes, and Python's None (an option not
    given) in words."""
    doc = doc.replace("``", "")
    doc = re.sub(r"(^|\. )None\b", r"\1Not given", doc)
    return re.sub(r"\bNone\b", "not given", doc)


def _attribute_docs(doc: str) -> dict[str, str]:
    """``name -> text`` from a Google-style docstring's ``Attributes:`` section."""
    section = doc.split("Attributes:", 1)[-1].split("Raises:", 1)[0]
    found: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        m = re.match(r"^ {8}(\w+): (.*)", line)
        if m:
            name, found[m[1]] = m[1], m[2]
        elif name and line.strip():
            found[name] += " " + line.strip()
    return found
