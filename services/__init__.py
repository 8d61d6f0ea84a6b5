"""histosynth serving side: core infrastructure and the gRPC services (no torch here)."""
