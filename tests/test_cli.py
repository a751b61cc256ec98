"""``pagedlora serve`` arguments -> ServerConfig (no server started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedlora.cli import build_parser, server_config
from pagedlora.server.config import AdapterSource


def config(*argv):
    return server_config(build_parser().parse_args(["serve", *argv]))


def test_models_adapters_and_engine_flags():
    c = config("--model", "a=/m/a", "--model", "b=/m/b.gguf", "--adapter", "a:fr=/l/fr",
               "--adapter", "b:x=/l/x=y", "--adapters-dir", "b=/dirs", "--pool-gb", "3",
               "--max-num-seqs", "4", "--no-enable-prefix-caching", "--policy", "fair",
               "--host-cache-gb", "0.5", "--max-body-mb", "1")
    assert c.models == {"a": Path("/m/a"), "b": Path("/m/b.gguf")}
    assert c.adapters == (AdapterSource("a", Path("/l/fr"), "fr"),
                          AdapterSource("b", Path("/l/x=y"), "x"),
                          AdapterSource("b", Path("/dirs")))
    assert c.engine_options == {"max_num_seqs": 4, "enable_prefix_caching": False,
                                "policy": "fair", "host_cache_gb": 0.5}
    assert c.pool_gb_per_model == 1.5 and c.max_body_bytes == 2**20
    assert c.engine_config().max_num_seqs == 4


def test_defaults_serve_the_embedded_model_and_give_adapters_to_it():
    c = config("--adapter", "fr=/l/fr", "--adapters-dir", "/dirs")
    assert c.models == {"SmolLM2-135M-Instruct": None}
    assert {a.model for a in c.adapters} == {"SmolLM2-135M-Instruct"}
    assert c.engine_options == {} and (c.host, c.port) == ("127.0.0.1", 8000)


@pytest.mark.parametrize("argv,match", [
    (["--model", "a"], "--model 'a': expected NAME=PATH"),
    (["--model", "a=/x", "--model", "a=/y"], "given twice"),
    (["--model", "a=/x", "--model", "b=/y", "--adapter", "fr=/p"], "several base models"),
    (["--model", "a=/x", "--adapter", "zz:fr=/p"], "unknown base model 'zz'"),
    (["--model", "a=/x", "--adapter", "a=/p"], r"unique and differ .*\['a'\]"),
    (["--adapter", "fr=/p", "--adapter", "fr=/q"], r"unique .*\['fr'\]"),
    (["--model", "bad name=/x"], "model name 'bad name'"),
    (["--max-num-seqs", "0"], "max_num_seqs must be a positive int"),
    (["--max-queue", "0"], "max_queue must be a positive int"),
    (["--pool-gb", "-1"], "pool_gb must be > 0"),
])
def test_bad_arguments_name_the_problem(argv, match):
    with pytest.raises(ValueError, match=match):
        config(*argv)


def replicas(*argv):
    from pagedlora.cli import replica_config

    args = build_parser().parse_args(["serve", *argv])
    return replica_config(args, server_config(args))


def test_replica_flags_make_the_ray_serve_config():
    r = replicas("--model", "a=/m/a", "--max-replicas", "4", "--min-replicas", "2",
                 "--target-ongoing-requests", "3", "--upscale-delay", "1",
                 "--downscale-delay", "5", "--cpus-per-replica", "2", "--routing",
                 "round_robin", "--max-num-seqs", "6", "--max-cpu-loras", "10")
    assert (r.autoscaling, r.min_replicas, r.max_replicas) == (True, 2, 4)
    assert (r.target_ongoing_requests, r.upscale_delay_s, r.downscale_delay_s) == (3, 1, 5)
    assert (r.cpus_per_replica, r.routing) == (2, "round_robin")
    # a full batch is an overloaded replica; it advertises what its pool and host memory hold
    assert r.ongoing_requests("a") == 6 and r.adapters_per_replica("a") == 8 + 10
    fixed = replicas("--replicas", "3")
    assert (fixed.autoscaling, fixed.num_replicas) == (False, 3)
    assert fixed.adapters_per_replica("SmolLM2-135M-Instruct") == -1  # host memory unbounded


@pytest.mark.parametrize("argv,match", [
    (["--replicas", "2", "--max-replicas", "3"], "exclude each other"),
    (["--max-replicas", "1", "--min-replicas", "2"], r"max_replicas \(1\) must be >= "),
    (["--replicas", "0"], "num_replicas must be a positive int"),
    (["--max-replicas", "2", "--target-ongoing-requests", "0"], "target_ongoing_requests"),
])
def test_bad_replica_flags_name_the_problem(argv, match):
    with pytest.raises(ValueError, match=match):
        replicas(*argv)
# -- the command itself (no model is loaded: every check below comes first) -------------------


def run_main(capsys, *argv) -> tuple[int, str, str]:
    from pagedlora.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version(capsys):
    from pagedlora import __version__

    assert run_main(capsys, "--version") == (0, f"pagedlora {__version__}\n", "")


def test_help_shows_choices_and_no_python_none(capsys):
    code, out, _ = run_main(capsys, "serve", "--help")
    assert code == 0
    for choices in ("--policy {fcfs,cluster,fair}", "--dtype {float32,bfloat16,float16}",
                    "--memory-layout {unified,static}", "--kernel-backend {auto,torch,triton}",
                    "--log-level {debug,info,warning,error}"):
        assert choices in out, choices
    assert "None" not in out and "(default: on)" in out


@pytest.mark.parametrize("argv,message", [
    (["--max-num-seqs", "0"], "max_num_seqs must be a positive int"),
    (["--policy", "lifo"], "invalid choice: 'lifo'"),
    (["--model", "a"], "expected NAME=PATH"),
])
def test_errors_print_the_subcommand_usage(capsys, argv, message):
    code, _, err = run_main(capsys, "serve", *argv)
    assert code == 2 and err.startswith("usage: pagedlora serve ") and message in err, err


def test_missing_paths_are_reported_before_any_model_loads(capsys, tmp_path):
    code, _, err = run_main(capsys, "serve", "--adapters-dir", str(tmp_path / "adapters"))
    assert code == 2 and f"--adapters-dir {tmp_path / 'adapters'}: no such file" in err, err
    assert "make demo" in err
    code, _, err = run_main(capsys, "serve", "--model", f"m={tmp_path / 'm'}")
    assert code == 2 and f"--model m={tmp_path / 'm'}: no such file" in err, err


def test_a_port_in_use_is_reported_before_any_model_loads(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_main(capsys, "serve", "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err, err
    assert "in use" in err


def test_serve_without_the_serve_extra_names_the_extra():
    import subprocess
    import sys

    code = ("import sys; sys.modules['fastapi'] = None; from pagedlora.cli import main; "
            "sys.exit(main(['serve']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "pip install 'pagedlora[serve]'" in r.stderr and "fastapi" in r.stderr
    assert "Traceback" not in r.stderr
