"""`histosynth augment`: WebDataset/Parquet shards on a local path and on S3 (a real moto server), resumable.

Generation runs against real servers on loopback over the fixture generation models, 64 x 64,
a handful of samples. The S3 tests start `moto_server` on a free loopback port with dummy
credentials; s3fs talks real HTTP to it.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from clients.augment import DATASET_RECORD, MANIFEST_DIR, TMP_DIR, augment
from clients.cli import SPECS_DIR, load_spec, main
from clients.client import HistosynthClient
from services.all_in_one import BackgroundServers
from services.generation.spec import GenerationSpec
from tests.fixtures.generation_models import write_generation_store
from tests.integration.conftest import server_config

SERVICES = ("refinement", "rendering", "generation")
COUNT, SHARD_SIZE, SIZE = 5, 2, 64  # shards {0,1}, {2,3}, {4}
FORMATS = ("webdataset", "parquet")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServers]:
    store = write_generation_store(tmp_path_factory.mktemp("augment") / "model_store")
    with BackgroundServers(server_config(store), SERVICES, {name: 0 for name in SERVICES}) as running:
        yield running


@pytest.fixture(scope="module")
def client(servers: BackgroundServers) -> Iterator[HistosynthClient]:
    client = HistosynthClient(targets=servers.addresses)
    yield client
    client.close()


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = yaml.safe_load((SPECS_DIR / "glands-balanced.yaml").read_text())
    data.update(height=SIZE, width=SIZE)
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def spec(spec_file: Path) -> GenerationSpec:
    return load_spec(spec_file, COUNT)


@pytest.fixture(scope="module")
def reference(client: HistosynthClient, spec: GenerationSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the dataset every interrupted-and-resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    summary = augment(client, spec, str(out), shard_size=SHARD_SIZE, formats=FORMATS)
    assert (summary.shards_written, summary.shards_skipped, summary.samples_generated) == (6, 0, COUNT)
    return out


def shard_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/shard-*"))}


def webdataset_samples(tar_bytes: Iterator[bytes]) -> dict[str, dict[str, bytes]]:
    """Key -> {suffix: bytes} from tar shards, read with the stdlib (independent of webdataset)."""
    samples: dict[str, dict[str, bytes]] = {}
    for data in tar_bytes:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def parquet_rows(frame: pd.DataFrame) -> dict[int, dict[str, Any]]:
    return {int(row["index"]): {k: row[k] for k in ("stratum", "image", "mask", "instances", "provenance", "scores")}
            for _, row in frame.iterrows()}


def test_local_shards_read_with_webdataset_and_pandas(
    reference: Path, spec_file: Path, servers: BackgroundServers, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sorted(shard_files(reference)) == [
        "parquet/shard-000000.parquet", "parquet/shard-000001.parquet", "parquet/shard-000002.parquet",
        "webdataset/shard-000000.tar", "webdataset/shard-000001.tar", "webdataset/shard-000002.tar",
    ]
    assert not (reference / TMP_DIR).exists()
    record = json.loads((reference / MANIFEST_DIR / DATASET_RECORD).read_text())
    assert record["count"] == COUNT and record["shard_size"] == SHARD_SIZE and record["spec"]["height"] == SIZE

    urls = [str(p) for p in sorted((reference / "webdataset").glob("shard-*.tar"))]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in read] == [f"{i:06d}" for i in range(COUNT)]
    for index, sample in enumerate(read):
        image = cv2.imdecode(np.frombuffer(sample["image.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        mask = cv2.imdecode(np.frombuffer(sample["mask.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        instances = cv2.imdecode(np.frombuffer(sample["instances.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.shape == (SIZE, SIZE, 3) and mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
        assert instances.dtype == np.uint16 and instances.shape == (SIZE, SIZE) and mask.max() <= 2
        meta = json.loads(sample["json"])
        assert meta["index"] == index and meta["provenance"]["models"][0]["name"] == "renderer-he-glands"
        assert meta["scores"] and meta["class_names"] == ["non-tissue", "stroma", "gland"]

    frame = pd.read_parquet(reference / "parquet")
    assert sorted(frame["index"]) == list(range(COUNT))
    assert pq.read_schema(reference / "parquet" / "shard-000000.parquet").names == [
        "index", "stratum", "image", "mask", "instances", "class_names", "provenance", "scores"]
    # Both formats hold the same bytes per sample.
    rows = parquet_rows(frame)
    for sample in read:
        row, meta = rows[int(sample["__key__"])], json.loads(sample["json"])
        assert (row["image"], row["mask"], row["instances"]) == (
            sample["image.png"], sample["mask.png"], sample["instances.png"])
        assert row["stratum"] == meta["stratum"] and json.loads(row["provenance"]) == meta["provenance"]
        assert json.loads(row["scores"]) == meta["scores"]

    # Through the CLI into a fresh directory: same bytes; a re-run finds everything done.
    out = reference.parent / "cli"
    args = ["augment", "--spec", str(spec_file), "--out", str(out), "--count", str(COUNT), "--shard-size",
            str(SHARD_SIZE), "--format", "webdataset,parquet", "--target", servers.addresses["generation"]]
    assert main(args) == 0
    assert f"wrote 6 shard files ({COUNT} samples, webdataset+parquet)" in capsys.readouterr().out
    assert shard_files(out) == shard_files(reference)
    assert main(args) == 0
    assert "wrote 0 shard files (0 samples" in capsys.readouterr().out
    # Another shard size (or spec, or count) would mix two datasets: refused, naming the difference.
    with pytest.raises(SystemExit, match=r"another dataset \(differs in \['shard_size'\]\)"):
        main([*args[:-4], "--shard-size", "3", "--target", servers.addresses["generation"]])
    with pytest.raises(SystemExit, match=r"--format: unknown format\(s\) \['tfrecord'\]"):
        main([*args[:-3], "tfrecord", "--target", servers.addresses["generation"]])


class Interrupt(RuntimeError):
    pass


def fail_after(shards: int) -> Any:
    committed: list[int] = []

    def on_shard(shard: int) -> None:
        committed.append(shard)
        if len(committed) >= shards:
            raise Interrupt(f"simulated crash after shard {shard}")

    return on_shard


def test_interrupted_run_resumes_to_identical_bytes(
    client: HistosynthClient, spec: GenerationSpec, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    with pytest.raises(Interrupt):
        augment(client, spec, str(out), shard_size=SHARD_SIZE, formats=FORMATS, on_shard=fail_after(1))
    partial = shard_files(out)
    assert len(partial) == 2  # one shard, in both formats; each one whole
    assert all(data == shard_files(reference)[name] for name, data in partial.items())
    # What a crash in the middle of writing leaves behind: debris under _tmp/, never a final name.
    (out / TMP_DIR).mkdir(exist_ok=True)
    (out / TMP_DIR / "shard-000001.tar.0123abcd").write_bytes(b"half a tar")

    summary = augment(client, spec, str(out), shard_size=SHARD_SIZE, formats=FORMATS)
    assert (summary.shards_written, summary.shards_skipped) == (4, 2)
    done = len(webdataset_samples(data for name, data in partial.items() if name.endswith(".tar")))
    assert summary.samples_generated == COUNT - done  # only the missing shards' samples were generated
    assert shard_files(out) == shard_files(reference)  # tar and parquet files byte-identical
    assert not (out / TMP_DIR).exists()

    # A format added later is made for every shard, the finished one left untouched.
    tar_only = tmp_path / "tar-only"
    augment(client, spec, str(tar_only), shard_size=SHARD_SIZE, formats=("webdataset",))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tar_only / "webdataset").iterdir()}
    summary = augment(client, spec, str(tar_only), shard_size=SHARD_SIZE, formats=FORMATS)
    assert (summary.shards_written, summary.shards_skipped) == (3, 3)
    assert {p.name: p.stat().st_mtime_ns for p in (tar_only / "webdataset").iterdir()} == mtimes
    assert shard_files(tar_only) == shard_files(reference)


def test_killed_process_leaves_only_whole_shards_and_resumes(
    client: HistosynthClient, spec_file: Path, servers: BackgroundServers, tmp_path: Path
) -> None:
    """SIGKILL a real `histosynth augment` process as soon as its first shard appears, then resume."""
    count, shard_size = 12, 1
    out, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    spec = load_spec(spec_file, count)
    augment(client, spec, str(uninterrupted), shard_size=shard_size, formats=FORMATS)
    expected = shard_files(uninterrupted)
    command = [sys.executable, "-m", "clients.cli", "augment", "--spec", str(spec_file), "--out", str(out),
               "--count", str(count), "--shard-size", str(shard_size), "--format", "webdataset,parquet",
               "--target", servers.addresses["generation"]]
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not list((out / "webdataset").glob("shard-*.tar")) and process.poll() is None:
            assert time.monotonic() < deadline, "no shard appeared within 30 s"
            time.sleep(0.002)
    finally:
        process.kill()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode in (0, -9), stderr.decode()
    # Whatever the kill interrupted, every file under a final name is a whole, correct shard.
    visible = shard_files(out)
    assert visible and all(data == expected[name] for name, data in visible.items())
    summary = augment(client, spec, str(out), shard_size=shard_size, formats=FORMATS)
    assert summary.shards_written == 2 * count - len(visible)
    assert shard_files(out) == expected


def test_ray_engine_writes_the_same_shards(
    client: HistosynthClient, spec: GenerationSpec, reference: Path, tmp_path: Path
) -> None:
    """One Ray task per shard (a local Ray instance with 2 CPUs), resuming a half-made dataset: same bytes."""
    ray = pytest.importorskip("ray")
    out = tmp_path / "ray"
    with pytest.raises(Interrupt):
        augment(client, spec, str(out), shard_size=SHARD_SIZE, formats=FORMATS, on_shard=fail_after(1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = augment(client, spec, str(out), shard_size=SHARD_SIZE, formats=FORMATS, engine="ray")
    finally:
        ray.shutdown()
    assert (summary.shards_written, summary.shards_skipped) == (4, 2)
    assert shard_files(out) == shard_files(reference)
    with pytest.raises(ValueError, match=r"unknown engine 'spark'; valid: \['local', 'ray'\]"):
        augment(client, spec, str(out), shard_size=SHARD_SIZE, formats=FORMATS, engine="spark")


# ------------------------------------------------------------------------------ S3
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if executable is None:
        pytest.fail("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on port {port} (exit code {process.poll()})")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def s3_options(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return {"endpoint_url": moto_endpoint, "skip_instance_cache": True}


def test_s3_write_resume_read_back(
    client: HistosynthClient, spec: GenerationSpec, spec_file: Path, reference: Path,
    servers: BackgroundServers, s3_options: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir("histosynth-test")
    uri = "s3://histosynth-test/ihc/v1"
    with pytest.raises(Interrupt):
        augment(client, spec, uri, shard_size=SHARD_SIZE, formats=FORMATS, storage_options=s3_options,
                on_shard=fail_after(2))
    fs.invalidate_cache()
    visible = sorted(fs.find("histosynth-test/ihc/v1"))
    finished = [key for key in visible if "/shard-" in key and f"/{TMP_DIR}/" not in key]
    assert len(finished) == 4 and not [key for key in visible if f"/{TMP_DIR}/" in key]
    made = len(webdataset_samples(fs.cat_file(key) for key in finished if key.endswith(".tar")))
    fs.pipe("histosynth-test/ihc/v1/_tmp/shard-000002.parquet.deadbeef", b"half a parquet")  # crash debris

    # Resume through the CLI, storage options as JSON.
    cli_options = json.dumps({k: v for k, v in s3_options.items() if k != "skip_instance_cache"})
    assert main(["augment", "--spec", str(spec_file), "--out", uri, "--count", str(COUNT), "--shard-size",
                 str(SHARD_SIZE), "--format", "parquet,webdataset", "--storage-options", cli_options,
                 "--target", servers.addresses["generation"]]) == 0
    assert f"wrote 2 shard files ({COUNT - made} samples, parquet+webdataset)" in capsys.readouterr().out

    fs.invalidate_cache()
    keys = sorted(fs.find("histosynth-test/ihc/v1"))
    assert [k for k in keys if f"/{TMP_DIR}/" in k] == []
    read_back = {key.removeprefix("histosynth-test/ihc/v1/"): fs.cat_file(key) for key in keys if "/shard-" in key}
    assert read_back == shard_files(reference)
    tars = [read_back[f"webdataset/shard-{k:06d}.tar"] for k in range(3)]
    assert sorted(webdataset_samples(iter(tars))) == [f"{i:06d}" for i in range(COUNT)]
    frame = pd.read_parquet(f"{uri}/parquet", storage_options=s3_options)
    assert parquet_rows(frame).keys() == set(range(COUNT))
