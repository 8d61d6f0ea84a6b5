"""`histosynth augment`: a spec's samples as WebDataset tar shards and/or Parquet files, local or on any fsspec URI.

    histosynth augment --spec clients/specs/glands-balanced.yaml --out data/glands --count 10000 --shard-size 1000
    histosynth augment --spec spec.yaml --out s3://bucket/glands --format webdataset,parquet

Layout below ``--out`` (a local directory or an object-store prefix):

    webdataset/shard-000000.tar    per sample NNNNNN.image.png, .mask.png (uint8 class ids),
                                   .instances.png (uint16), .json (index, stratum, class names,
                                   scores, provenance)
    parquet/shard-000000.parquet   columns index, stratum, image, mask, instances (PNG bytes),
                                   class_names, provenance, scores (JSON text)
    _manifest/dataset.json         the spec, count and shard size the shards were made from
    _tmp/                          shards being written (never read; cleared when a run starts and ends)

Shard k holds exactly the indices [k*K, (k+1)*K) (the last one fewer when K does not divide
--count), and sample i depends only on the spec, i and the model versions, so a shard's
content is fixed before it is made. A run lists the shards present under their final names,
generates only the samples of the missing ones, and commits each shard as a whole:

* it is first written completely under ``_tmp/``; locally it is then renamed to its final
  name (``os.replace``: atomic within one filesystem); on S3 (and any other object store)
  the finished ``_tmp/`` object is copied server-side to the final key, then the temporary
  one is deleted. An S3 object becomes visible only once its PUT / CopyObject has
  completed, so a final key is either absent or whole.
* hence a crash (kill -9, lost connection) leaves at most debris under ``_tmp/``, which
  readers never look at (they read ``webdataset/shard-*.tar`` or the ``parquet/``
  directory, where only final names appear); the next run redoes exactly the shards
  without a final name. Re-running a finished job does nothing.

One run per destination at a time: a run clears ``_tmp/`` when it starts.

Engines (``--engine``): ``local`` streams every missing sample from one Generate call in this
process; ``ray`` runs one Ray task per missing shard (RAY_ADDRESS names a cluster, else a local
Ray instance is started), each task calling the same generation servers and committing its
own shard. Both write byte-identical shards.

Credentials on Ray workers: a task on another node does not see the driver's environment or
~/.aws, so ``--storage-options`` travel with each task and the driver's cloud credentials are
passed as the tasks' environment (``runtime_env.env_vars``, see :func:`worker_environment`): every
AWS_* / GOOGLE_* / AZURE_* / GCS_* variable set on the driver, plus, for s3:// destinations without
a key in ``--storage-options``, the credentials botocore resolves on the driver (profile, SSO, instance
role) as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN. Session tokens expire: a long
run needs credentials that outlive it (or a worker role on the cluster). They are visible to whoever
can inspect the Ray job (its runtime_env); on a shared cluster give workers their own role instead and
pass ``--no-forward-credentials``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from clients.client import ClientSample, HistosynthClient
from services.core.extras import require_extra
from services.core.png import encode_label_png
from services.generation.spec import GenerationSpec

SHARD_PREFIX: Final = "shard-"
SHARD_DIGITS: Final = 6
TMP_DIR: Final = "_tmp"
MANIFEST_DIR: Final = "_manifest"
DATASET_RECORD: Final = "dataset.json"
DEFAULT_SHARD_SIZE: Final = 1000

SampleEncoder = Callable[[Sequence[ClientSample], Path], None]


# ------------------------------------------------------------------ sample encoding
def label_png(array: np.ndarray, dtype: type[np.integer]) -> bytes:
    """A label map as a lossless PNG with its integer type kept (uint8 classes, uint16 instances)."""
    return encode_label_png(array, dtype)


@dataclasses.dataclass(frozen=True)
class EncodedSample:
    """One sample as the bytes both formats store."""

    index: int
    stratum: str
    image_png: bytes
    mask_png: bytes
    instances_png: bytes
    class_names: tuple[str, ...]
    provenance_json: str
    scores_json: str

    @classmethod
    def from_client(cls, sample: ClientSample) -> EncodedSample:
        instances = sample.instances if sample.instances is not None else np.zeros(sample.mask.shape, np.uint16)
        if int(instances.max(initial=0)) > np.iinfo(np.uint16).max:
            raise ValueError(f"sample {sample.index}: instance ids above 65535 cannot be stored as uint16 PNG")
        return cls(
            index=sample.index,
            stratum=sample.stratum,
            image_png=sample.image_png,
            mask_png=label_png(sample.mask, np.uint8),
            instances_png=label_png(instances, np.uint16),
            class_names=tuple(sample.class_names),
            provenance_json=json.dumps(sample.provenance, sort_keys=True),
            scores_json=json.dumps(dict(sorted(sample.scores.items())), sort_keys=True),
        )

    @property
    def key(self) -> str:
        return f"{self.index:0{SHARD_DIGITS}d}"

    def record_json(self) -> bytes:
        record = {
            "index": self.index,
            "stratum": self.stratum,
            "class_names": list(self.class_names),
            "scores": json.loads(self.scores_json),
            "provenance": json.loads(self.provenance_json),
        }
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def write_webdataset_shard(samples: Sequence[EncodedSample], path: Path) -> None:
    """A tar in WebDataset layout; headers hold no time, owner or mode of this run: equal samples, equal bytes."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            members = (
                ("image.png", sample.image_png),
                ("mask.png", sample.mask_png),
                ("instances.png", sample.instances_png),
                ("json", sample.record_json()),
            )
            for suffix, data in members:
                info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def write_parquet_shard(samples: Sequence[EncodedSample], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("index", pa.int64()),
        ("stratum", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("instances", pa.binary()),
        ("class_names", pa.list_(pa.string())),
        ("provenance", pa.string()),
        ("scores", pa.string()),
    ])
    table = pa.table(
        {
            "index": [s.index for s in samples],
            "stratum": [s.stratum for s in samples],
            "image": [s.image_png for s in samples],
            "mask": [s.mask_png for s in samples],
            "instances": [s.instances_png for s in samples],
            "class_names": [list(s.class_names) for s in samples],
            "provenance": [s.provenance_json for s in samples],
            "scores": [s.scores_json for s in samples],
        },
        schema=schema,
    )
    # PNGs are already compressed; compressing them again only costs time.
    stored = {"image", "mask", "instances"}
    pq.write_table(table, path, compression={name: "NONE" if name in stored else "ZSTD" for name in schema.names},
                   use_dictionary=["stratum"])


# format -> (file extension, writer); each format has its own directory (named after it) below the root,
# so e.g. `pandas.read_parquet(<root>/parquet)` reads the whole dataset.
FORMATS: Final[dict[str, tuple[str, SampleEncoder]]] = {
    "webdataset": ("tar", write_webdataset_shard),
    "parquet": ("parquet", write_parquet_shard),
}


def parse_formats(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ValueError(f"--format: unknown format(s) {unknown or [text]}; valid: {sorted(FORMATS)} (comma-separated)")
    return names


def shard_name(shard: int, fmt: str) -> str:
    return f"{SHARD_PREFIX}{shard:0{SHARD_DIGITS}d}.{FORMATS[fmt][0]}"


def _shard_pattern(fmt: str) -> re.Pattern[str]:
    return re.compile(rf"^{SHARD_PREFIX}(\d{{{SHARD_DIGITS},}})\.{FORMATS[fmt][0]}$")


# --------------------------------------------------------------------- destination
class Destination:
    """A local directory or fsspec URI holding shards; commits each one atomically (see the module docstring)."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def finished_shards(self) -> dict[str, set[int]]:
        """Shard ids present under their final names, per format; nothing else counts."""
        finished: dict[str, set[int]] = {}
        for fmt in FORMATS:
            directory, pattern = self.path(fmt), _shard_pattern(fmt)
            self.fs.invalidate_cache(directory)  # object-store listings are cached; another run may have written
            entries = self.fs.ls(directory, detail=False) if self.fs.exists(directory) else []
            names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
            finished[fmt] = {int(match.group(1)) for name in names if (match := pattern.match(name))}
        return finished

    def clear_tmp(self) -> None:
        tmp = self.path(TMP_DIR)
        self.fs.invalidate_cache(tmp)
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)

    def read_text(self, *parts: str) -> str | None:
        path = self.path(*parts)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as stream:
            return stream.read().decode("utf-8")

    def commit(self, name: str, write: Callable[[Path], None], subdir: str | None = None) -> str:
        """Write a file with ``write(local_path)`` under ``_tmp/``, then make it appear whole under its final name."""
        final = self.path(subdir, name) if subdir else self.path(name)
        token = f"{name}.{uuid.uuid4().hex}"
        if self.is_local:
            tmp_dir = Path(self.path(TMP_DIR))
            tmp_dir.mkdir(parents=True, exist_ok=True)
            staged = tmp_dir / token
            try:
                write(staged)
                with open(staged, "rb") as stream:  # on disk before the rename, so a power cut cannot
                    os.fsync(stream.fileno())       # leave the final name pointing at unwritten blocks
                Path(final).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
            finally:
                staged.unlink(missing_ok=True)
            return final
        tmp_key = self.path(TMP_DIR, token)
        with tempfile.TemporaryDirectory(prefix="histosynth-augment-") as local_dir:
            staged = Path(local_dir) / name
            write(staged)
            self.fs.put_file(str(staged), tmp_key)
        try:
            self.fs.copy(tmp_key, final)  # server-side copy: the final key appears whole or not at all
        finally:
            self.fs.rm(tmp_key)
        return final


# ------------------------------------------------------------------------- the job
@dataclasses.dataclass(frozen=True)
class ShardPlan:
    count: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.shard_size}")

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_size)

    def indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.count))

    def shard_of(self, index: int) -> int:
        return index // self.shard_size


@dataclasses.dataclass
class AugmentSummary:
    uri: str
    formats: tuple[str, ...]
    shards_total: int
    shards_written: int  # shards (per format) committed by this run
    shards_skipped: int  # shards (per format) already finished at the destination
    samples_generated: int
    seconds: float

    def line(self) -> str:
        rate = self.samples_generated / self.seconds if self.seconds > 0 else 0.0
        return (
            f"wrote {self.shards_written} shard files ({self.samples_generated} samples, "
            f"{'+'.join(self.formats)}) to {self.uri}; {self.shards_skipped} already finished, "
            f"{self.shards_total} shards per format in total; {self.seconds:.1f} s = {rate:.2f} images/s"
        )


def _claim_destination(destination: Destination, spec: GenerationSpec, plan: ShardPlan) -> None:
    """Record what the shards are made of; refuse to resume a dataset made with another spec, count or shard size.

    ``count`` matters here (unlike for `generate`): the last shard holds fewer samples when K
    does not divide it, and a larger count would leave that short shard counted as finished.
    """
    current = json.loads(json.dumps({"spec": spec.parameters(), "count": plan.count, "shard_size": plan.shard_size}))
    text = destination.read_text(MANIFEST_DIR, DATASET_RECORD)
    if text is not None:
        previous = json.loads(text)
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise SystemExit(
                f"{destination.uri} holds shards of another dataset (differs in {changed}); "
                "use a new --out, or the original spec, --count and --shard-size to resume"
            )
        return
    body = (json.dumps(current, indent=2, sort_keys=True) + "\n").encode()
    destination.commit(DATASET_RECORD, lambda path: path.write_bytes(body), subdir=MANIFEST_DIR)


def _complete_shards(
    samples: Iterable[ClientSample], plan: ShardPlan, wanted: Iterable[int]
) -> Iterator[tuple[int, list[EncodedSample]]]:
    """Group a stream (in any order) into whole shards, yielding each as soon as its last sample arrives."""
    pending: dict[int, dict[int, EncodedSample]] = {shard: {} for shard in wanted}
    for sample in samples:
        shard = plan.shard_of(sample.index)
        if shard not in pending:
            raise RuntimeError(f"server sent sample {sample.index}, which belongs to no shard being made")
        pending[shard][sample.index] = EncodedSample.from_client(sample)
        if len(pending[shard]) == len(plan.indices(shard)):
            done = pending.pop(shard)
            yield shard, [done[i] for i in plan.indices(shard)]
    if pending:
        missing = sorted(i for shard in pending for i in plan.indices(shard) if i not in pending[shard])
        more = " ..." if len(missing) > 10 else ""
        raise RuntimeError(f"generation stream ended without samples {missing[:10]}{more}")


def _commit_shard(
    destination: Destination, shard: int, samples: Sequence[EncodedSample], formats: Iterable[str]
) -> int:
    """Commit one shard in each of ``formats``; returns how many files were committed."""
    written = 0
    for fmt in formats:
        encoder = FORMATS[fmt][1]
        destination.commit(shard_name(shard, fmt), lambda path, e=encoder: e(samples, path), subdir=fmt)
        written += 1
    return written


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What an engine must make: these shards, each in the formats it lacks."""

    spec: GenerationSpec
    plan: ShardPlan
    uri: str
    storage_options: Mapping[str, Any] | None
    missing: Mapping[int, tuple[str, ...]]  # shard -> formats not yet at the destination
    timeout: float | None
    forward_credentials: bool = True  # ray: pass the driver's cloud credentials to the tasks


ShardDone = Callable[[int, int, int], None]  # (shard, samples generated, files committed)


def run_local(client: HistosynthClient, job: ShardJob, destination: Destination, done: ShardDone) -> None:
    """One stream for every missing sample, in this process; each shard is committed as soon as it is whole."""
    shards = sorted(job.missing)
    indices = [i for k in shards for i in job.plan.indices(k)]
    stream = client.generate(job.spec, indices=indices, timeout=job.timeout)
    for shard, samples in _complete_shards(stream, job.plan, shards):
        done(shard, len(samples), _commit_shard(destination, shard, samples, job.missing[shard]))


def _make_shard_task(connection: Mapping[str, Any], job: ShardJob, shard: int) -> tuple[int, int, int]:
    """A Ray task: generate one shard's samples over gRPC and commit it (any worker, any node)."""
    destination = Destination(job.uri, job.storage_options)
    with HistosynthClient(**connection) as client:
        stream = client.generate(job.spec, indices=list(job.plan.indices(shard)), timeout=job.timeout)
        [(_, samples)] = list(_complete_shards(stream, job.plan, [shard]))
    return shard, len(samples), _commit_shard(destination, shard, samples, job.missing[shard])


CREDENTIAL_ENV_PREFIXES: Final = ("AWS_", "GOOGLE_", "AZURE_", "GCS_")


def worker_environment(
    uri: str, storage_options: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None,
    *, resolve_aws: bool = True,
) -> dict[str, str]:
    """Environment variables a Ray task needs to reach ``uri`` with the driver's credentials.

    The driver's cloud credential variables, and for s3:// URIs without ``key`` / ``secret`` in
    ``storage_options`` the credentials botocore resolves here (profiles and roles live in files or
    metadata services the workers may not have).
    """
    environ = os.environ if environ is None else environ
    env = {key: value for key, value in environ.items() if key.startswith(CREDENTIAL_ENV_PREFIXES)}
    options = dict(storage_options or {})
    if resolve_aws and uri.startswith(("s3://", "s3a://")) and not ({"key", "secret"} & set(options)) \
            and "AWS_ACCESS_KEY_ID" not in env:
        try:
            import botocore.session
        except ImportError:
            return env
        profile = options.get("profile") or environ.get("AWS_PROFILE")
        credentials = botocore.session.Session(profile=profile).get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            env["AWS_ACCESS_KEY_ID"] = frozen.access_key
            env["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
            if frozen.token:
                env["AWS_SESSION_TOKEN"] = frozen.token
            env.pop("AWS_PROFILE", None)  # the profile's file is not on the workers
    return env


def run_ray(client: HistosynthClient, job: ShardJob, destination: Destination, done: ShardDone) -> None:
    """One Ray task per missing shard, against the same generation servers as ``client``.

    Joins the cluster named by RAY_ADDRESS, else starts a local one for the run. The tasks
    connect to the client's targets, so on a multi-node cluster those must be reachable from
    every node (use --target; embedded services listen on this machine's loopback only).
    Shards commit atomically, so cancelling the remaining tasks on an error is like a crash:
    no partial shard, and the next run makes what is missing.
    """
    import ray

    if client.channel_credentials is not None:
        raise ValueError("--engine ray: TLS channel credentials cannot be sent to Ray workers; use --engine local")
    connection = {"target": client.target, "targets": dict(client.targets), "timeout": client.timeout,
                  "token": client.token}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    try:
        options: dict[str, Any] = {"num_cpus": 1}
        if job.forward_credentials:
            env = worker_environment(job.uri, job.storage_options)
            if env:
                options["runtime_env"] = {"env_vars": env}
        task = ray.remote(**options)(_make_shard_task)
        pending = [task.remote(connection, job, shard) for shard in sorted(job.missing)]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                done(*ray.get(ready[0]))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    finally:
        if started_here:
            ray.shutdown()


Engine = Callable[[HistosynthClient, ShardJob, Destination, ShardDone], None]
ENGINES: Final[dict[str, Engine]] = {"local": run_local, "ray": run_ray}


def engine_named(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; valid: {sorted(ENGINES)}") from None


def require_augment_packages(uri: str, formats: Sequence[str], engine: str) -> None:
    """Fail before any server starts when a package of the 'augment' extra that this run needs is missing.

    fsspec writes every destination; pyarrow only Parquet, ray only ``--engine ray``, s3fs only s3:// URIs
    (other fsspec protocols such as gs:// need their own package, which fsspec names itself).
    """
    modules = ["fsspec"]
    if "parquet" in formats:
        modules.append("pyarrow")
    if engine == "ray":
        modules.append("ray")
    if uri.startswith(("s3://", "s3a://")):
        modules.append("s3fs")
    require_extra("augment", "histosynth augment", modules)


def augment(
    client: HistosynthClient,
    spec: GenerationSpec,
    uri: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    formats: Sequence[str] = ("webdataset",),
    storage_options: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    engine: str = "local",
    on_shard: Callable[[int], None] | None = None,
    forward_credentials: bool = True,
) -> AugmentSummary:
    """Generate the spec's missing shards into ``uri``; ``on_shard(k)`` runs once shard k is in every format."""
    formats = tuple(dict.fromkeys(formats))
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; valid: {sorted(FORMATS)}")
    run = engine_named(engine)
    require_augment_packages(uri, formats, engine)
    plan = ShardPlan(spec.count, shard_size)
    destination = Destination(uri, storage_options)
    _claim_destination(destination, spec, plan)
    destination.clear_tmp()
    finished = destination.finished_shards()
    missing = {k: lacking for k in range(plan.shards) if (lacking := tuple(f for f in formats if k not in finished[f]))}
    started = time.perf_counter()
    totals = {"written": 0, "generated": 0}

    def done(shard: int, generated: int, written: int) -> None:
        totals["generated"] += generated
        totals["written"] += written
        if on_shard is not None:
            on_shard(shard)

    if missing:
        job = ShardJob(spec, plan, uri, storage_options, missing, timeout, forward_credentials)
        run(client, job, destination, done)
    destination.clear_tmp()  # empty after a clean run; removing it leaves only the dataset
    return AugmentSummary(
        uri=uri,
        formats=formats,
        shards_total=plan.shards,
        shards_written=totals["written"],
        shards_skipped=plan.shards * len(formats) - sum(len(f) for f in missing.values()),
        samples_generated=totals["generated"],
        seconds=time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------ CLI
def cmd_augment(args: argparse.Namespace) -> int:
    from clients.cli import _Embedded, load_spec

    try:
        formats = parse_formats(args.format)
        storage_options = json.loads(args.storage_options) if args.storage_options else None
    except (ValueError, json.JSONDecodeError) as error:
        raise SystemExit(str(error)) from None
    if storage_options is not None and not isinstance(storage_options, dict):
        raise SystemExit("--storage-options: expected a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}'")
    spec = load_spec(Path(args.spec), args.count)
    if args.seed is not None:
        spec = dataclasses.replace(spec, seed=args.seed)
    try:
        ShardPlan(spec.count, args.shard_size)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    require_augment_packages(args.out, formats, args.engine)  # before the embedded servers load models
    with _Embedded(args) as client:
        summary = augment(client, spec, args.out, shard_size=args.shard_size, formats=formats,
                          storage_options=storage_options, timeout=args.timeout, engine=args.engine,
                          forward_credentials=not args.no_forward_credentials)
    print(summary.line())
    return 0


def add_augment_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "augment", help="generate a spec's samples as WebDataset/Parquet shards on a path or fsspec URI (resumable)"
    )
    parser.add_argument("--spec", required=True, help="YAML spec (see clients/specs/)")
    parser.add_argument("--out", required=True, help="local directory or fsspec URI (s3://bucket/prefix, gs://, ...)")
    parser.add_argument("--count", type=int, help="number of samples (overrides the spec's count)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"samples per shard; shard k holds indices [k*K, (k+1)*K) (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--format", default="webdataset",
                        help=f"comma-separated, any of {sorted(FORMATS)} (default webdataset)")
    parser.add_argument("--seed", type=int, help="override the spec's seed")
    parser.add_argument("--storage-options", help="JSON object passed to fsspec, e.g. '{\"endpoint_url\": \"...\"}'")
    parser.add_argument("--target", help="generation server host:port (default: services embedded in this process)")
    parser.add_argument("--model-store", help="model repository root for the embedded services")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="local",
                        help="local: one stream in this process (default); ray: one Ray task per shard "
                             "(RAY_ADDRESS names a cluster, else a local one is started)")
    parser.add_argument("--no-forward-credentials", action="store_true",
                        help="ray: do not pass the driver's cloud credentials (AWS_*/GOOGLE_*/AZURE_*/GCS_* variables, "
                             "botocore-resolved S3 keys) to the tasks' environment; workers use their own")
    parser.add_argument("--timeout", type=float, help="deadline for the whole stream (per shard with ray), seconds")
    parser.set_defaults(func=cmd_augment)
