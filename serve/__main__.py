"""``python -m serve``: parse settings, then serve in one process or, with
``--api-server-count N``, in N front-end processes over one engine core."""

from __future__ import annotations

import asyncio
import sys

from serve.cli import finalize_engine_args, parse_settings
from serve.server import configure_logging, enable_stack_dumps, serve_single


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv if argv is not None else sys.argv[1:])
    configure_logging(settings.log_level)
    enable_stack_dumps()
    finalize_engine_args(settings)
    if settings.api_server_count > 1:
        from serve.multiproc import serve_multi

        sys.exit(serve_multi(settings))
    try:
        import uvloop

        code = uvloop.run(serve_single(settings))
    except ImportError:
        code = asyncio.run(serve_single(settings))
    sys.exit(code)


if __name__ == "__main__":
    main()
