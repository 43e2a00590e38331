"""`python -m serving.gateway [--host H] [--port P] [--workers N]`: run the gateway with uvicorn.

Flags override the GATEWAY_* environment; SIGTERM stops accepting connections, lets in-flight requests finish
(up to GATEWAY_SHUTDOWN_GRACE seconds), then closes the gRPC channel.
"""

from __future__ import annotations

import argparse
import os

import uvicorn

from serving.gateway.logs import configure
from serving.gateway.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.gateway", description=__doc__)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--model-server", help="gRPC target of the model server, host:port")
    args = parser.parse_args(argv)
    # Flags go through the environment so that every worker process sees the same settings.
    for name in ("host", "port", "workers", "model_server"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"GATEWAY_{name.upper()}"] = str(value)
    settings = Settings()
    configure(settings.log_level)
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    uvicorn.run(
        "serving.gateway.app:create_app", factory=True, host=settings.host, port=settings.port,
        workers=settings.workers, loop=loop, log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=settings.shutdown_grace, timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
