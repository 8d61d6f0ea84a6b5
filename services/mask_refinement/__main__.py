"""`python -m services.mask_refinement`: serve refiner models (coarse -> fine tissue masks).

Wiring only. Settings come from HISTOSYNTH_* environment variables (services.core.config.ServerConfig:
HISTOSYNTH_PORT, HISTOSYNTH_MODEL_STORE, HISTOSYNTH_DEVICES, ...); the server speaks the domain API, the
KServe v2 GRPCInferenceService, health and reflection on one port, and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio

from services.core.config import ServerConfig
from services.core.grpc_server import serve
from services.core.logging import configure_logging
from services.mask_refinement.servicer import create_host, registrations


async def main() -> None:
    config = ServerConfig.from_env()
    configure_logging(config.log_level, config.log_format)
    host = create_host(config)
    await host.start()  # load before serving, so health says SERVING only when models answer
    await serve(registrations(host), config, shutdown_hooks=[host.stop])


if __name__ == "__main__":
    asyncio.run(main())
