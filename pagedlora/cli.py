"""The ``pagedlora`` command (``python -m pagedlora``); ``pagedlora serve`` runs the HTTP server.

Every :class:`~pagedlora.EngineConfig` field but ``pool_gb`` is an option of ``serve``
(``max_num_seqs`` -> ``--max-num-seqs``), with the field's documentation as its help, so the
two never drift apart; :func:`add_engine_options` and :func:`engine_options` give other scripts
(``examples/offline_batch.py``) the same options with the same spelling.

``serve --model-dir`` (and ``--sagemaker``) read SageMaker LMI's configuration: a model
directory's ``serving.properties`` and the ``OPTION_*`` environment. Precedence: explicit
flags > serving.properties > environment > defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path

from pagedlora import __version__
from pagedlora.config import (
    DTYPES,
    KERNEL_BACKENDS,
    MEMORY_LAYOUTS,
    MERGE_POLICIES,
    POLICIES,
    EngineConfig,
)
from pagedlora.sources import as_source, is_s3_url

DEFAULT_HOST, SAGEMAKER_HOST = "127.0.0.1", "0.0.0.0"
DEFAULT_PORT, SAGEMAKER_PORT = 8000, 8080
DEFAULT_MAX_QUEUE, DEFAULT_MAX_BODY_MB, DEFAULT_POOL_GB = 256, 4.0, 1.0

_CONVERTERS = {"int": int, "float": float, "str": str}
_CHOICES = {"dtype": DTYPES, "kernel_backend": KERNEL_BACKENDS, "memory_layout": MEMORY_LAYOUTS,
            "policy": POLICIES, "merge_policy": MERGE_POLICIES}
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
        "/v1/unload_lora_adapter, SageMaker LMI's /invocations, /ping and "
        "/models/{model}/adapters, /health, /metrics. Models and adapters may be local paths, "
        "s3:// URLs or Hugging Face ids in the local Hugging Face cache.")
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
    what.add_argument("--model-dir", action="append", default=[], metavar="[NAME=]DIR",
                      help="a SageMaker LMI model directory (local, .tar.gz or s3://), served "
                      "as NAME (the inference component): its serving.properties and the "
                      "OPTION_* environment configure it (explicit flags win), the model is "
                      "option.model_id or its own files, its adapters/ are served with "
                      "option.enable_lora=true; repeat for several base models")
    what.add_argument("--sagemaker", action="store_true",
                      help="run as a SageMaker (LMI) container: listen on 0.0.0.0:8080 (or "
                      "SAGEMAKER_BIND_TO_PORT), serve /opt/ml/model when no --model or "
                      "--model-dir is given, use CUDA when a device is visible")
    what.add_argument("--state-dir", type=Path, metavar="DIR",
                      help="record adapters loaded at run time here and load them again at "
                      "the next start (default: not kept)")
    http = serve.add_argument_group("HTTP")
    http.add_argument("--host", help=f"address to listen on (default {DEFAULT_HOST}: this "
                      f"machine only; {SAGEMAKER_HOST} with --sagemaker)")
    http.add_argument("--port", type=int, help=f"TCP port (default {DEFAULT_PORT}; "
                      f"{SAGEMAKER_PORT} with --sagemaker)")
    http.add_argument("--max-queue", type=int, metavar="N",
                      help="most requests per base model waiting for their first token; more "
                      f"get 503 with Retry-After (default: {DEFAULT_MAX_QUEUE})")
    http.add_argument("--max-body-mb", type=float, metavar="MB",
                      help=f"largest request body in MiB; larger gets 413 (default: "
                      f"{DEFAULT_MAX_BODY_MB})")
    http.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                      help="on SIGTERM, seconds running requests may take to finish before "
                      "they are aborted (default: %(default)s)")
    http.add_argument("--log-level", default="info",
                      choices=["debug", "info", "warning", "error"])
    _add_replica_options(serve)
    engine = serve.add_argument_group("engine (pagedlora.EngineConfig, for every base model)")
    engine.add_argument("--pool-gb", type=float, metavar="G",
                        help="GiB of unified pool in all, split evenly between the base models "
                        f"(default: {DEFAULT_POOL_GB}, or LMI's gpu_memory_utilization on CUDA)")
    add_engine_options(engine)
    return parser


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``pagedlora serve``: checks what it can before loading models (arguments, paths, the
    port, the serve extra), printing the subcommand's usage for a bad argument; 1 when a model
    or adapter cannot load."""
    try:
        config = server_config(args, os.environ)
        _check_paths(config)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    except OSError as e:  # an LMI model directory or model that cannot be had
        print(f"pagedlora serve: error: {e}", file=sys.stderr)
        return 1
    ray_config = None
    if args.replicas is not None or args.max_replicas is not None:
        try:
            ray_config = replica_config(args, config)
        except ValueError as e:
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
    if ray_config is not None:
        return _serve_replicas(ray_config, args.ray_address)
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
        if isinstance(path, Path) and not path.exists():
            raise FileNotFoundError(f"--model {name}={path}: no such file or directory")
    for a in config.adapters:
        if isinstance(a.path, Path) and not is_s3_url(str(a.path)) and not a.path.exists():
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


def server_config(args: argparse.Namespace, env: Mapping[str, str] | None = None):
    """The :class:`~pagedlora.server.config.ServerConfig` of parsed ``serve`` arguments.

    With ``--model-dir`` or ``--sagemaker``, the LMI model directories are read (downloaded
    when remote, which is slow) with ``env`` for their ``OPTION_*`` settings; explicit flags
    win over them.

    Raises:
        ValueError: a malformed ``NAME=PATH``, a name given twice, a refused LMI option
            (``LmiConfigError``, naming each), or as ServerConfig.
        TypeError: as ServerConfig.
        OSError: an LMI model directory or model that cannot be had (``SourceError``).
    """
    from pagedlora.server.config import AdapterSource, ServerConfig

    models = dict(_split(m, "--model", "NAME=PATH") for m in args.model)
    if len(models) < len(args.model):
        raise ValueError("--model: the same NAME is given twice")
    adapters = []
    for text in args.adapter:
        left, path = _split(text, "--adapter", "[MODEL:]NAME=PATH")
        model, _, name = left.rpartition(":")
        adapters.append(AdapterSource(model or None, as_source(path), name))
    for text in args.adapters_dir:
        model, _, path = text.partition("=") if "=" in text else ("", "", text)
        adapters.append(AdapterSource(model or None, as_source(path)))
    options = engine_options(args)
    server: dict = {}
    pool_gb = args.pool_gb
    model_options: dict[str, dict] = {}
    lmi_dirs = [_split_optional(d) for d in args.model_dir]
    if args.sagemaker and not lmi_dirs and not models:
        from pagedlora.server.lmi_deployment import SAGEMAKER_MODEL_DIR

        lmi_dirs = [(None, SAGEMAKER_MODEL_DIR)]
    if args.sagemaker and "device" not in options:
        options["device"] = _sagemaker_device()
    models = {name: as_source(path) for name, path in models.items()}
    if lmi_dirs:
        from pagedlora.server.lmi_deployment import lmi_deployment, pool_gb_for_utilization

        deployment = lmi_deployment(lmi_dirs, os.environ if env is None else env,
                                    _num_devices(options.get("device", "cpu")))
        for m in deployment.models:
            if m.name in models:
                raise ValueError(f"--model-dir: the name {m.name!r} is also a --model")
            models[m.name] = m.model
            adapters += [AdapterSource(m.name, folder) for folder in m.adapters]
            model_options[m.name] = {k: v for k, v in m.engine_options.items()
                                     if k not in options}  # explicit flags win
        server = deployment.server
        fraction = server.get("gpu_memory_utilization")
        if pool_gb is None and fraction is not None:
            pool_gb = pool_gb_for_utilization(fraction, options.get("device", "cpu"),
                                              deployment.models)
    host = args.host or (SAGEMAKER_HOST if args.sagemaker else DEFAULT_HOST)
    port = _first(args.port, server.get("port"),
                  SAGEMAKER_PORT if args.sagemaker else DEFAULT_PORT)
    max_body = (int(args.max_body_mb * 2**20) if args.max_body_mb is not None
                else server.get("max_body_bytes", int(DEFAULT_MAX_BODY_MB * 2**20)))
    return ServerConfig(models=models, adapters=tuple(adapters), host=host, port=port,
                        pool_gb=_first(pool_gb, DEFAULT_POOL_GB),
                        max_queue=_first(args.max_queue, server.get("max_queue"),
                                         DEFAULT_MAX_QUEUE),
                        max_body_bytes=max_body,
                        shutdown_timeout_s=args.shutdown_timeout, engine_options=options,
                        model_options=model_options, state_dir=args.state_dir)


def _serve_replicas(config, address: str | None) -> int:
    """``pagedlora serve --replicas/--max-replicas``: Ray Serve until SIGTERM or Ctrl-C."""
    try:
        from pagedlora.ray_serve.deploy import serve_forever
    except ModuleNotFoundError as e:
        if e.name.split(".")[0] != "ray":
            raise
        print(f"pagedlora serve: error: replicas need the 'ray' extra ({e.name} is missing): "
              f"pip install 'pagedlora[ray]' (in a clone: pip install -e '.[ray]')",
              file=sys.stderr)
        return 1
    serve_forever(config, address)
    return 0


def _add_replica_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s Ray Serve options (``--replicas`` or ``--max-replicas`` switch them on)."""
    from pagedlora.ray_serve.config import ROUTINGS
    from pagedlora.ray_serve.config import RayServeConfig as R

    ray = serve.add_argument_group(
        "replicas (Ray Serve; needs pip install 'pagedlora[ray]')",
        "Serve each base model from several engine replicas behind one endpoint (the same "
        "routes), routed by adapter with Ray Serve's model multiplexing. --pool-gb is then "
        "each replica's pool.")
    ray.add_argument("--replicas", type=int, metavar="N",
                     help="replicas of each base model (a fixed number)")
    ray.add_argument("--max-replicas", type=int, metavar="N",
                     help="autoscale between --min-replicas and this many replicas")
    ray.add_argument("--min-replicas", type=int, default=R.min_replicas, metavar="N",
                     help="fewest replicas when autoscaling (default: %(default)s)")
    ray.add_argument("--target-ongoing-requests", type=float,
                     default=R.target_ongoing_requests, metavar="N",
                     help="the autoscaler's target of ongoing requests per replica "
                     "(default: %(default)s)")
    ray.add_argument("--upscale-delay", type=float, default=R.upscale_delay_s, metavar="S",
                     help="seconds above the target before adding a replica "
                     "(default: %(default)s)")
    ray.add_argument("--downscale-delay", type=float, default=R.downscale_delay_s,
                     metavar="S", help="seconds below the target before removing a replica, "
                     "which finishes its requests first (default: %(default)s)")
    ray.add_argument("--cpus-per-replica", type=float, default=R.cpus_per_replica,
                     metavar="N", help="CPU cores each replica reserves (default: %(default)s)")
    ray.add_argument("--gpus-per-replica", type=float, default=R.gpus_per_replica,
                     metavar="N", help="GPUs each replica reserves (default: %(default)s)")
    ray.add_argument("--max-adapters-per-replica", type=int, metavar="N",
                     help="adapters a replica advertises to the router as its own (default: "
                     "max_loras + max_cpu_loras; no limit without --max-cpu-loras)")
    ray.add_argument("--routing", choices=ROUTINGS, default=R.routing,
                     help="adapter: to a replica holding the request's adapter; round_robin: "
                     "adapter-blind (default: %(default)s)")
    ray.add_argument("--ray-address", metavar="ADDRESS",
                     help="the Ray cluster to join (default: RAY_ADDRESS, or a new local one)")


def replica_config(args: argparse.Namespace, server):
    """The :class:`~pagedlora.ray_serve.RayServeConfig` of parsed ``serve`` arguments
    around ``server`` (:func:`server_config`'s).

    Raises:
        ValueError: as RayServeConfig, or both --replicas and --max-replicas.
    """
    from pagedlora.ray_serve.config import RayServeConfig

    if args.replicas is not None and args.max_replicas is not None:
        raise ValueError("--replicas (a fixed number) and --max-replicas (autoscaling) "
                         "exclude each other")
    return RayServeConfig(
        server, num_replicas=1 if args.replicas is None else args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
        upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay,
        cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
        max_adapters_per_replica=args.max_adapters_per_replica, routing=args.routing)


def _first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def _sagemaker_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _num_devices(device: str) -> int:
    """Accelerators of ``device``'s kind this process sees (1 for the CPU)."""
    if not device.startswith("cuda"):
        return 1
    import torch

    return torch.cuda.device_count()


def _split_optional(text: str) -> tuple[str | None, str]:
    """``"[NAME=]SOURCE"`` -> ``(NAME or None, SOURCE)``; a source may hold ``=`` only after a
    name (``s3://`` URLs and paths rarely do)."""
    name, found, source = text.partition("=")
    if not found or "/" in name or ":" in name:
        return None, text
    return name, source


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
