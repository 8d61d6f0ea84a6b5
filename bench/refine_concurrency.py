"""Why is Refine through gRPC below in-process ONNX Runtime at concurrency 4-8? (issue #15, item 5 follow-up)

    .venv/bin/python -m bench.refine_concurrency [--duration 4] [--concurrency 1 4 8]

mask-refiner at 256x256, closed-loop clients (bench_serving.paired_sweep: modes interleaved in rounds, same
window), (a) the in-process ONNX Runtime session of bench_serving against gRPC servers that differ in one
setting each:
  grpc            service defaults (max_batch_size 8, 1 instance per device, ORT intra-op threads 0)
  grpc-b1         max_batch_size 1 (no merged batches: does batching cost on this CPU?)
  grpc-2inst      2 instances per device (two batches compute at once, as (a)'s concurrent calls do)
  grpc-nospin     ORT intra-op threads do not spin-wait (session.intra_op.allow_spinning = 0), 1 instance
  grpc-2inst-nospin  both
  grpc-spinstop   intra-op threads spin within a run but stop when it returns (session.force_spinning_stop = 1):
                  on 2 cores a pool thread still spinning after the run competes with the server's event loop,
                  gRPC and client threads for the post-run work (issue #15 item 5; not measurable with the
                  cores shared with training jobs, hence a variant to run in a quiet window)
Writes bench/results/refine_concurrency.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench import bench_serving as bs
from clients.client import HistosynthClient
from services.core.model_store import ModelStore
from services.core.runtimes import onnxruntime as ort_runtime
from services.core.runtimes.base import RuntimeOptions
from services.core.runtimes.onnxruntime import OnnxRuntime
from services.mask_refinement import servicer as refinement_servicer

NO_SPIN: dict[str, str] = {"session.intra_op.allow_spinning": "0"}
SPIN_STOP: dict[str, str] = {"session.force_spinning_stop": "1"}
# name -> (ServerConfig overrides, ORT session config entries of the server's sessions)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "grpc": ({}, {}),
    "grpc-b1": ({"max_batch_size": 1}, {}),
    "grpc-2inst": ({"instances_per_device": 2}, {}),
    "grpc-nospin": ({}, NO_SPIN),
    "grpc-2inst-nospin": ({"instances_per_device": 2}, NO_SPIN),
    "grpc-spinstop": ({}, SPIN_STOP),
}


class _SpinSwitch:
    """ort with SessionOptions that carry extra session config entries (for sessions created while set)."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(ort, name)

    def SessionOptions(self) -> ort.SessionOptions:  # noqa: N802 - mirrors ort's name
        options = ort.SessionOptions()
        for key, value in self.entries.items():
            options.add_session_config_entry(key, value)
        return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per mode and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=bs.REPO_ROOT / "bench" / "results" / "refine_concurrency.json")
    args = parser.parse_args()

    switch = _SpinSwitch()
    ort_runtime.ort = switch  # type: ignore[assignment] - only SessionOptions differs
    bs.CONCURRENCIES = tuple(args.concurrency)
    store = ModelStore(bs.MODEL_STORE)
    manifest = store.get(bs.REFINER)
    workload = bs.refine_workload(manifest, 256, 256)
    runtime = OnnxRuntime(manifest.path, manifest.inputs, manifest.outputs, "cpu", RuntimeOptions())
    load_start = bs.load_average()
    loop = bs.LoopThread()
    servers, clients = [], {}
    try:
        for name in args.variants:
            overrides, switch.entries = VARIANTS[name]
            server, _ = loop.run(refinement_servicer.start(bs.server_config(**overrides), store))
            servers.append(server)
            clients[name] = HistosynthClient(targets={"refinement": server.address}, timeout=600)
            clients[name].refine(workload.service_input, model=workload.model)  # loads the model with this setting
        switch.entries = {}
        calls = {"runtime": lambda: runtime.infer(workload.runtime_feeds)}
        for name, client in clients.items():
            calls[name] = lambda c=client: c.refine(workload.service_input, model=workload.model)
        results = bs.paired_sweep(workload, calls, args.duration, 4)
    finally:
        for client in clients.values():
            client.close()
        for server in servers:
            loop.run(server.stop(0))
        loop.close()
        runtime.close()
    rows = [result.__dict__ for result in results]
    base = {r["concurrency"]: r["images_per_s"] for r in rows if r["mode"] == "runtime"}
    for row in rows:
        row["ratio_over_in_process"] = round(row["images_per_s"] / base[row["concurrency"]], 3)
    report = {"benchmark": "refine_concurrency", "machine": bs.machine_info(), "cpus": os.cpu_count(),
              "load_average_start": load_start, "load_average_end": bs.load_average(),
              "variants": {name: {"overrides": VARIANTS[name][0], "ort_session_config": VARIANTS[name][1]}
                           for name in args.variants}, "rows": rows}
    args.output.write_text(json.dumps(report, indent=1))
    for row in rows:
        print(f"c={row['concurrency']} {row['mode']:18s} {row['images_per_s']:7.2f} img/s "
              f"ratio {row['ratio_over_in_process']:.2f} p50 {row['latency_ms']['p50']} ms")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
