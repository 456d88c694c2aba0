"""``attribution bench reindex``: what a nightly reindex reads of the dataset.

Writes a Parquet dataset of ``--n`` rows in files of ``--rows-per-file``, builds its index,
adds ``--add`` of the rows as one new file and reindexes. Reports, per storage (a local
folder, and an S3-protocol server), the seconds of both builds and the bytes of dataset
files each one read: the job's own count (sizes of the files it opened) and, on S3, the
bytes a counting proxy in front of the server saw served (every process, every library).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attribution_core.config import ProjectConfig
from attribution_core.data.storage import filesystem_for
from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows, write_parquet_dataset
from attribution_core.errors import ConfigError
from attribution_core.models.tiny import build_tiny_pipeline
from pipelines.bench.s3_counter import CountingProxy
from pipelines.index.job import IndexRequest, run_index
from pipelines.index.listing import s3_listing_filesystem
from pipelines.output import print_report
from pipelines.ray_runtime import ensure_ray


class ReadRun(TypedDict, total=False):
    """One index run over the dataset: what it featurized, and the source bytes it read
    (and, through the counting proxy, what S3 served)."""

    seconds: float
    rows: int
    featurized: int
    files: int
    files_read: int
    bytes_read: int
    dataset_bytes: int
    read_fraction: float
    bytes_served_by_s3: int
    served_fraction: float


class Builds(TypedDict, total=False):
    first_build: ReadRun
    reindex: ReadRun
    rows_added: int
    added_fraction: float


def _builds(cfg: ProjectConfig, root: str, model: str, args: argparse.Namespace,
            *, proxy: CountingProxy | None) -> Builds:

    data, index = f"{root}/data", f"{root}/index"
    write_parquet_dataset(data, synthetic_rows(args.n, seed=0, size=args.image_size), SYNTH_SCHEMA,
                          {"kind": "synthetic"}, rows_per_file=args.rows_per_file)
    out: Builds = {}
    added = max(1, round(args.n * args.add))
    for name in ("first_build", "reindex"):
        if name == "reindex":
            rows = [dict(r, example_id=f"added-{i}") for i, r in
                    enumerate(synthetic_rows(added, seed=1, size=args.image_size))]
            fs, path = filesystem_for(data)
            pq.write_table(pa.Table.from_pylist(rows, schema=SYNTH_SCHEMA), f"{path}/part-new-0.parquet", filesystem=fs)
        if proxy is not None:
            proxy.reset()
        started = time.perf_counter()
        built = run_index(cfg, IndexRequest(dataset=data, model=model, out=index))
        seconds = time.perf_counter() - started
        run: ReadRun = {"seconds": round(seconds, 2), "rows": built["rows"], "featurized": built["featurized"],
               "files": built["source_files"], "files_read": built["source_files_hashed"],
               "bytes_read": built["source_bytes_read"], "dataset_bytes": built["source_bytes"],
               "read_fraction": round(built["source_bytes_read"] / built["source_bytes"], 5)}
        if proxy is not None:
            served = proxy.read_bytes(path_of(data))
            run.update(bytes_served_by_s3=served, served_fraction=round(served / built["source_bytes"], 5))
        out[name] = run
    out["rows_added"] = added
    out["added_fraction"] = round(added / (args.n + added), 5)
    return out


def path_of(uri: str) -> str:
    return filesystem_for(uri)[1]


@contextlib.contextmanager
def _s3(bucket: str):
    """An S3-protocol endpoint behind a counting proxy: the one the AWS variables name, else
    moto's server started here on 127.0.0.1. The proxy becomes ``AWS_ENDPOINT_URL``."""
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                           "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    server = None
    upstream = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    try:
        if upstream is None:
            try:
                from moto.server import ThreadedMotoServer
            except ImportError as exc:
                raise ConfigError("bench reindex --where s3 starts a local S3 server with moto (pip install "
                                  "-e '.[dev]'), or set AWS_ENDPOINT_URL to your S3-protocol endpoint") from exc
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            upstream = f"http://{host}:{port}"
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        with CountingProxy(upstream) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            if not s3_listing_filesystem().exists(bucket):
                endpoint = urlparse(proxy.url)
                pafs.S3FileSystem(endpoint_override=endpoint.netloc, scheme=endpoint.scheme, allow_bucket_creation=True,
                                  region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")).create_dir(bucket)
            yield proxy
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if server is not None:
            server.stop()


def main(args: argparse.Namespace) -> int:

    cfg = ProjectConfig.load(args.config)
    cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, kernel="block_diagonal", damping_rule="fixed",
                                                             approximate=dataclasses.replace(cfg.index.approximate,
                                                                                             build="never")))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-reindex-"))
    model = str(build_tiny_pipeline("text", work / "model", resolution=args.resolution, widths=(8, 16)))
    result: dict[str, Any] = {"rows": args.n, "rows_per_file": args.rows_per_file, "add": args.add,
                              "image_size": args.image_size}
    wheres = ["local", "s3"] if args.where == "both" else [args.where]
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(_s3(args.bucket)) if "s3" in wheres else None
        ensure_ray(None)  # a local Ray started here, so its workers read S3 through the proxy
        for where in wheres:
            root = str(work / "local") if where == "local" else f"s3://{args.bucket}/bench-reindex-{int(time.time())}"
            result[where] = _builds(cfg, root, model, args, proxy=proxy if where == "s3" else None)
    result["work"] = str(work)
    print_report(result, args.json)
    return 0
