"""`python -m services.scoring`: serve encoders and segmenters (FID/KID/PR, KS/KL, mIoU/Dice/TPS, consistency).

Wiring only. Settings come from HISTOSYNTH_* environment variables (services.core.config.ServerConfig:
HISTOSYNTH_PORT, HISTOSYNTH_MODEL_STORE, HISTOSYNTH_DEVICES, ...) plus HISTOSYNTH_SCORING_* (ScoringSettings:
MAX_KEPT_FEATURES, MAX_BOOTSTRAP_RESAMPLES, DEFAULT_EXTRACTOR). One port serves the Scoring API, the KServe v2
GRPCInferenceService over the same models, health and reflection; /metrics on HISTOSYNTH_METRICS_PORT; SIGTERM drains.
"""

from __future__ import annotations

import asyncio

from services.core.config import ServerConfig
from services.core.grpc_server import serve
from services.core.logging import configure_logging
from services.scoring.servicer import create_host, load_scoring_settings, registrations


async def main() -> None:
    config = ServerConfig.from_env()
    settings = load_scoring_settings()  # fail on a bad HISTOSYNTH_SCORING_* value before loading models
    configure_logging(config.log_level, config.log_format)
    host = create_host(config)
    await host.start()  # load before serving, so health says SERVING only when models answer
    await serve(registrations(host, settings), config, shutdown_hooks=[host.stop])


if __name__ == "__main__":
    asyncio.run(main())
