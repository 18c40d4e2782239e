"""Fixtures of the server tests: a FakeEngine behind a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from fake_engine import FakeEngine  # noqa: E402
from server_harness import ServerThread  # noqa: E402

from jaxserve.server.config import ServerConfig  # noqa: E402


def make_config(**kw) -> ServerConfig:
    kw.setdefault("port", 0)
    kw.setdefault("uvicorn_log_level", "warning")
    return ServerConfig(**kw)


@pytest.fixture(scope="session")
def server():
    """The shared server: default limits, model name "fake-model", max_model_len 128.
    Tests may read its engine's records but must restore any state they change."""
    with ServerThread(FakeEngine(), make_config()) as s:
        yield s


@pytest.fixture
def fresh_server():
    """A factory of private servers (own engine and config), closed after the test."""
    started = []

    def make(engine: FakeEngine | None = None, **config):
        engine = engine or FakeEngine()
        if config.get("max_num_seqs"):  # serve.py builds the engine with the flag's value
            engine.max_num_seqs = config["max_num_seqs"]
        s = ServerThread(engine, make_config(**config))
        started.append(s.__enter__())
        return s

    yield make
    for s in started:
        s.__exit__(None, None, None)
