"""`python -m services.mask_rendering`: serve renderer models (class masks -> RGB images).

Wiring only. Settings come from HISTOSYNTH_* environment variables (services.core.config.ServerConfig:
HISTOSYNTH_PORT, HISTOSYNTH_MODEL_STORE, HISTOSYNTH_DEVICES, ...) and, for tiling, HISTOSYNTH_RENDER_TILE_SIZE /
HISTOSYNTH_RENDER_TILE_OVERLAP (servicer.RenderingSettings). The server speaks the domain API, the KServe v2
GRPCInferenceService, health and reflection on one port, and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio

from services.core.config import ServerConfig
from services.core.grpc_server import serve
from services.core.logging import configure_logging
from services.diffusion.pipeline import DiffusionSettings
from services.mask_rendering.servicer import RenderingSettings, create_host, registrations


async def main() -> None:
    config = ServerConfig.from_env()
    settings = RenderingSettings.from_env()  # HISTOSYNTH_RENDER_TILE_SIZE / _TILE_OVERLAP
    configure_logging(config.log_level, config.log_format)
    host = create_host(config)
    await host.start()  # load before serving, so health says SERVING only when models answer
    diffusion = DiffusionSettings.from_server_config(config)  # HISTOSYNTH_DIFFUSION_*
    await serve(registrations(host, settings, diffusion), config, shutdown_hooks=[host.stop])


if __name__ == "__main__":
    asyncio.run(main())
