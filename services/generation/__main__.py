"""`python -m services.generation`: serve the Generation service (spec -> stream of samples).

Wiring only. Settings come from HISTOSYNTH_* environment variables (services.core.config.ServerConfig)
and HISTOSYNTH_GENERATION_* (services.generation.remote.GenerationSettings):

* HISTOSYNTH_GENERATION_RENDERING_ADDRESS set (the Helm chart's way): this process loads no model and
  calls the MaskRendering / MaskRefinement / Scoring servers at the configured addresses.
* unset: embedded — renderers, refiner and segmenters load here (services.all_in_one.create_stack);
  `histosynth serve --all` also shares them with the other services of the process.
"""

from __future__ import annotations

import asyncio

from services.core.config import ServerConfig
from services.core.grpc_server import serve
from services.core.logging import configure_logging
from services.generation.remote import GenerationSettings
from services.generation.servicer import create_remote_stack, registrations


async def main() -> None:
    config = ServerConfig.from_env()
    settings = GenerationSettings.from_env()
    configure_logging(config.log_level, config.log_format)
    if settings.remote:
        stack = create_remote_stack(config, settings)
    else:
        from services.all_in_one import create_stack  # the embedded composition root

        stack = create_stack(config)
    await stack.start_hosts()  # load before serving, so health says SERVING only when models answer
    await serve(registrations(stack), config, shutdown_hooks=[stack.stop])


if __name__ == "__main__":
    asyncio.run(main())
