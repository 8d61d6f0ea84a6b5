"""Diffusion serving (issue #9): numpy schedulers, the step-level batching engine, mask decode, pipelines."""
