"""`python tests/server/serve_fake.py [serve.py flags]`: run_server around a FakeEngine, as
serve.py does around the real one. Used by the shutdown tests; prints the engine's aborts last."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from fake_engine import FakeEngine  # noqa: E402

from jaxserve.server.cli import parse_server_config, run_server  # noqa: E402


def main() -> None:
    config = parse_server_config(sys.argv[1:])
    engines = []

    def factory():
        engines.append(FakeEngine(token_delay=0.05))
        return engines[0]

    run_server(factory, config)
    print(f"aborted: {len(engines[0].aborted)} stopped: {engines[0].stopped}", flush=True)


if __name__ == "__main__":
    main()
