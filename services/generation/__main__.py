"""`python -m services.generation`: serve the Generation service (spec -> stream of samples).

Wiring only. Settings come from HISTOSYNTH_* environment variables (services.core.config.ServerConfig);
this process hosts its own renderer and refiner models. To share batchers with the MaskRendering and
MaskRefinement services, run them in one process: `histosynth serve --all`.
"""

from __future__ import annotations

import asyncio

from services.core.config import ServerConfig
from services.core.grpc_server import serve
from services.core.logging import configure_logging
from services.generation.servicer import create_stack, registrations


async def main() -> None:
    config = ServerConfig.from_env()
    configure_logging(config.log_level, config.log_format)
    stack = create_stack(config)
    await stack.start_hosts()  # load before serving, so health says SERVING only when models answer
    await serve(registrations(stack), config, shutdown_hooks=[stack.stop])


if __name__ == "__main__":
    asyncio.run(main())
