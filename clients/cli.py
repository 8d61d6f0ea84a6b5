"""`histosynth` command line: serve the services, generate datasets, run the demo.

    histosynth serve --all                       # every service in one process, one port each
    histosynth serve --service rendering --port 50052
    histosynth generate --spec clients/specs/glands-balanced.yaml --count 100 --out data/glands
    histosynth generate --spec spec.yaml --out DIR --target 127.0.0.1:50053   # a running server
    histosynth run-demo                          # `make run`: small balanced batches into ./output
    histosynth augment --spec spec.yaml --out s3://bucket/ds --shard-size 1000   # WebDataset/Parquet shards
    histosynth models list | verify              # the model store: what it holds, sha256s checked

The model store is --model-store, else HISTOSYNTH_MODEL_STORE, else ./model_store, else
~/.local/share/histosynth/model_store (services.core.store_location); --spec takes a file or
the name of a shipped example spec (glands-balanced, nuclei, ...: clients/specs/).

`generate` without --target is embedded: it starts refinement, rendering and generation
on free loopback ports inside this process, talks gRPC to them and shuts them down. It is
resumable: a sample is finished when its NNNNNN.json exists (written last, atomically), and
a re-run only asks the server for the missing indices — sample i is the same whichever
subset it is generated in.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from clients.client import ClientSample, HistosynthClient, spec_from_dict, tls_credentials
from services.core.config import ConfigError, ServerConfig
from services.core.extras import MissingExtraError
from services.core.store_location import ModelStoreNotFoundError, locate_model_store
from services.generation.sink import SampleWriter
from services.generation.spec import MASK_GENERATOR_FOR_TISSUE, RENDERER_FOR_TISSUE, GenerationSpec

SPECS_DIR = Path(__file__).resolve().parent / "specs"
DEMO_SPECS = ("glands-balanced.yaml", "ihc-ki67-bins.yaml", "nuclei.yaml", "nuclei-diffusion.yaml")
EMBEDDED_SERVICES = ("refinement", "rendering", "generation")


# ----------------------------------------------------------------------- helpers
def server_config(args: argparse.Namespace, **overrides: Any) -> ServerConfig:
    """HISTOSYNTH_* environment settings, with command-line flags winning; the model store must exist."""
    values: dict[str, Any] = {"model_store": locate_model_store(getattr(args, "model_store", None))}
    if getattr(args, "host", None):
        values["host"] = args.host
    values.update(overrides)
    return ServerConfig.from_env(overrides=values)


def shipped_spec(path: Path) -> Path | None:
    """A shipped example spec that ``path`` names (``nuclei``, ``nuclei.yaml``, ``clients/specs/nuclei.yaml``).

    The specs travel in the wheel, so an installed ``histosynth`` run from any directory finds the
    README's examples even though the relative path ``clients/specs/...`` exists only in a checkout.
    """
    name = Path(path).name
    candidate = SPECS_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return candidate if candidate.is_file() else None


def load_spec(path: Path, count: int | None) -> GenerationSpec:
    path = Path(path)
    if not path.is_file() and (shipped := shipped_spec(path)) is not None:
        path = shipped
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        shipped_names = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
        raise SystemExit(f"spec file not found: {path} (shipped specs, usable by name: {shipped_names})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a YAML mapping at the top level")
    try:
        return spec_from_dict(data, count)
    except ValueError as error:
        raise SystemExit(f"{path}: {error}") from None


def sample_record(sample: ClientSample) -> dict[str, Any]:
    return {
        "index": sample.index,
        "stratum": sample.stratum,
        "class_names": list(sample.class_names),
        "scores": dict(sorted(sample.scores.items())),
        "provenance": sample.provenance,
    }


@dataclasses.dataclass
class RunSummary:
    out: Path
    generated: int
    skipped: int
    seconds: float
    per_stratum: dict[str, int]
    per_class_mean_fraction: dict[str, float]
    per_class_samples: dict[str, int]
    per_class_objects: dict[str, int]  # nuclei per type (nucleus tissues), summed over samples
    total_finished: int

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["images_per_second"] = round(self.images_per_second, 3)
        return data

    def lines(self) -> list[str]:
        lines = [
            f"wrote {self.generated} new samples to {self.out} ({self.skipped} already finished, "
            f"{self.total_finished} in total) in {self.seconds:.1f} s = {self.images_per_second:.2f} images/s",
            "  samples per stratum: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.per_stratum.items())),
            "  mean area fraction per class (samples containing it): "
            + ", ".join(
                f"{k}: {self.per_class_mean_fraction[k]:.3f} ({self.per_class_samples[k]})"
                for k in self.per_class_mean_fraction
            ),
        ]
        if self.per_class_objects:
            lines.append(
                "  nuclei per class: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.per_class_objects.items()))
            )
        return lines


def summarize(out: Path, generated: int, skipped: int, seconds: float) -> RunSummary:
    """Counts over every finished sample in ``out`` (this run's and earlier runs')."""
    per_stratum: Counter[str] = Counter()
    fractions: dict[str, list[float]] = defaultdict(list)
    present: Counter[str] = Counter()
    objects: Counter[str] = Counter()
    records = sorted(out.glob("[0-9]*.json"))
    for path in records:
        record = json.loads(path.read_text(encoding="utf-8"))
        per_stratum[record.get("stratum", "?")] += 1
        for key, value in record.get("scores", {}).items():
            if key.startswith("fraction/"):
                name = key.split("/", 1)[1]
                fractions[name].append(float(value))
                if value > 0:
                    present[name] += 1
            elif key.startswith("count/"):
                objects[key.split("/", 1)[1]] += int(value)
    return RunSummary(
        out=out,
        generated=generated,
        skipped=skipped,
        seconds=seconds,
        per_stratum=dict(per_stratum),
        per_class_mean_fraction={k: sum(v) / len(v) for k, v in fractions.items()},
        per_class_samples={k: present[k] for k in fractions},
        per_class_objects=dict(objects),
        total_finished=len(records),
    )


SPEC_RECORD = "spec.json"


def _claim_directory(out: Path, spec: GenerationSpec) -> None:
    """Record the spec in ``out``; refuse to resume into a directory generated from another spec.

    The record leaves out ``count`` (sample i does not depend on it), so a dataset can be
    extended with a larger --count; any other difference would mix two datasets.
    """
    record = out / SPEC_RECORD
    current = json.loads(json.dumps(spec.parameters()))  # tuples -> lists, as read back from the file
    if record.exists():
        previous = json.loads(record.read_text(encoding="utf-8"))
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise SystemExit(
                f"{out} holds samples of another spec (differs in {changed}); "
                "use a new --out directory, or the original spec to resume"
            )
        return
    record.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def generate_to_dir(
    client: HistosynthClient,
    spec: GenerationSpec,
    out: Path,
    *,
    progress: bool = True,
    timeout: float | None = None,
) -> RunSummary:
    """Generate the spec's missing samples into ``out``; returns the summary (also written as summary.json)."""
    from tqdm import tqdm

    writer = SampleWriter(out)
    _claim_directory(out, spec)
    finished = {i for i in writer.finished_indices() if i < spec.count}
    todo = [i for i in range(spec.count) if i not in finished]
    started = time.perf_counter()
    generated = 0
    if todo:
        bar = tqdm(total=len(todo), desc=f"{spec.tissue} -> {out}", unit="img", disable=not progress)
        try:
            for sample in client.generate(spec, indices=todo, timeout=timeout):
                writer.write(sample.index, sample.image_png, sample.mask, sample.instances, sample_record(sample))
                generated += 1
                bar.update(1)
        finally:
            bar.close()
    summary = summarize(out, generated, len(finished), time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return summary


class _Embedded:
    """Context: in-process servers on free loopback ports (or nothing when a target is given)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._servers = None

    def __enter__(self) -> HistosynthClient:
        from services.all_in_one import BackgroundServers

        if getattr(self._args, "target", None):
            return HistosynthClient(self._args.target, **_client_security(self._args))
        # In-process servers on loopback: plaintext and no token whatever HISTOSYNTH_TLS_*/AUTH_* say.
        config = server_config(
            self._args, host="127.0.0.1", port=0, metrics_port=None, log_level="WARNING",
            tls_cert=None, tls_key=None, tls_client_ca=None, tls_require_client_cert=False, auth_token_file=None,
        )
        logging.getLogger().setLevel(logging.WARNING)
        self._servers = BackgroundServers(config, EMBEDDED_SERVICES, {name: 0 for name in EMBEDDED_SERVICES})
        self._servers.start()
        self._client = HistosynthClient(targets=self._servers.addresses)
        return self._client

    def __exit__(self, *exc_info: object) -> None:
        if self._servers is not None:
            self._client.close()
            self._servers.stop()


def _client_security(args: argparse.Namespace) -> dict[str, Any]:
    """TLS / token options of a --target client (clients.client.tls_credentials), from the flags' files."""
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    token_file = getattr(args, "token_file", None)
    use_tls = bool(ca or cert or getattr(args, "tls", False))
    return {
        "channel_credentials": tls_credentials(ca, cert, key) if use_tls else None,
        "token": Path(token_file).read_text(encoding="utf-8").strip() if token_file else None,
    }


# ---------------------------------------------------------------------- commands
def cmd_generate(args: argparse.Namespace) -> int:
    spec = load_spec(Path(args.spec), args.count)
    if args.seed is not None:
        spec = dataclasses.replace(spec, seed=args.seed)
    out = Path(args.out)
    with _Embedded(args) as client:
        summary = generate_to_dir(client, spec, out, progress=not args.no_progress, timeout=args.timeout)
    for line in summary.lines():
        print(line)
    return 0


def _available_tissues(model_store: Path) -> list[str]:
    """Tissues whose models (renderer, and mask generator where the tissue has one) are in the store."""
    return [
        tissue for tissue, name in RENDERER_FOR_TISSUE.items()
        if (model_store / name).is_dir()
        and (tissue not in MASK_GENERATOR_FOR_TISSUE or (model_store / MASK_GENERATOR_FOR_TISSUE[tissue]).is_dir())
    ]


def cmd_run_demo(args: argparse.Namespace) -> int:
    config = server_config(args)
    tissues = _available_tissues(Path(config.model_store))
    specs = []
    for file_name in DEMO_SPECS:
        spec = load_spec(SPECS_DIR / file_name, args.count)
        if spec.tissue in tissues:
            specs.append((Path(file_name).stem, spec))
    if not specs:
        print(
            f"no renderer models found in {config.model_store} (looked for {sorted(RENDERER_FOR_TISSUE.values())}); "
            "train and export them (see README) or pass --model-store",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    started = time.perf_counter()
    print(f"starting services on loopback (CPU) with models from {config.model_store} ...")
    total = 0
    with _Embedded(args) as client:
        for name, spec in specs:
            summary = generate_to_dir(client, spec, out / name, progress=not args.no_progress)
            total += summary.generated
            for line in summary.lines():
                print(line)
    elapsed = time.perf_counter() - started
    print(f"demo done: {total} new images under {out.resolve()} in {elapsed:.1f} s (services started and stopped)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from services.all_in_one import available_services, default_ports, start_all
    from services.core.logging import configure_logging

    config = server_config(args, **({"port": args.port} if args.port is not None else {}))
    services = available_services() if args.all or not args.service else tuple(args.service)
    configure_logging(config.log_level, config.log_format)

    async def run() -> None:
        ports = default_ports(config.port, services) if len(services) > 1 else {services[0]: config.port}
        running = await start_all(config, services, ports)
        for name, address in running.addresses.items():
            print(f"{name}: {address}", flush=True)
        metrics_ports = [s.metrics_port for s in running.servers.values() if s.metrics_port is not None]
        if metrics_ports:
            print(f"metrics: http://{config.host}:{metrics_ports[0]}/metrics", flush=True)
        scheme = "https" if config.tls_cert is not None else "http"
        for name, server in running.servers.items():
            if server.http_port is not None:  # services speaking KServe v2 also answer it over REST
                print(f"{name} KServe v2 REST: {scheme}://{config.host}:{server.http_port}/v2", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        print("draining ...", flush=True)
        await running.stop()

    asyncio.run(run())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histosynth", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run services (all in one process, or one of them)")
    which = serve.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every available service, each on its own port (default)")
    which.add_argument("--service", action="append", choices=("refinement", "rendering", "generation", "scoring"),
                       help="serve only this service (repeatable)")
    serve.add_argument("--port", type=int, help="base port (services take base, base+1, ...); default HISTOSYNTH_PORT")
    serve.add_argument("--host", help="bind address (default HISTOSYNTH_HOST = 127.0.0.1)")
    serve.add_argument("--model-store", help="model repository root (default HISTOSYNTH_MODEL_STORE, ./model_store, "
                                             "~/.local/share/histosynth/model_store)")
    serve.set_defaults(func=cmd_serve)

    generate = commands.add_parser("generate", help="generate samples from a spec into a directory (resumable)")
    generate.add_argument("--spec", required=True, help="YAML spec (see clients/specs/)")
    generate.add_argument("--count", type=int, help="number of samples (overrides the spec's count)")
    generate.add_argument("--out", required=True, help="output directory")
    generate.add_argument("--seed", type=int, help="override the spec's seed")
    where = generate.add_mutually_exclusive_group()
    where.add_argument("--target", help="generation server host:port (default: --embedded)")
    where.add_argument("--embedded", action="store_true", help="start the services in this process (default)")
    generate.add_argument("--model-store", help="model repository root for --embedded")
    generate.add_argument("--tls", action="store_true", help="--target over TLS with the system CA roots")
    generate.add_argument("--tls-ca", help="--target over TLS: PEM CA bundle that signed the server certificate")
    generate.add_argument("--tls-cert", help="--target with mutual TLS: client certificate chain (PEM)")
    generate.add_argument("--tls-key", help="--target with mutual TLS: client private key (PEM)")
    generate.add_argument("--token-file", help="--target with auth: file holding the bearer token")
    generate.add_argument("--timeout", type=float, help="deadline for the whole stream, seconds")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("run-demo", help="`make run`: small balanced batches with the shipped models")
    demo.add_argument("--out", default="output", help="output directory (default ./output)")
    demo.add_argument("--count", type=int, default=12, help="samples per example spec (default 12)")
    demo.add_argument("--model-store", help="model repository root (default HISTOSYNTH_MODEL_STORE, ./model_store, "
                                            "~/.local/share/histosynth/model_store)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_run_demo, target=None)

    from clients.augment import add_augment_parser  # here, not at the top: clients.augment imports this module
    from clients.model_audit import add_models_parser

    add_augment_parser(commands)
    add_models_parser(commands)
    return parser


# Setup problems the user fixes with a flag, a variable or an install: one line, no traceback.
USER_ERRORS: Final = (ModelStoreNotFoundError, MissingExtraError, ConfigError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        print(f"histosynth {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
