"""Serving core: model store, runtimes, dynamic batching, device pool, metrics, gRPC bootstrap.

Nothing in this package imports generated protobuf code.
"""
