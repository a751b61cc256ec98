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
