"""``attribution bench scale``: every stage at Stable Diffusion 1.5's size.

Builds a pipeline directory with SD 1.5's shapes and random weights (UNet 860 M, CLIP ViT-L
text encoder, VAE; stored as fp16 as SD checkpoints are kept; nothing downloaded), writes a
handful of 512x512 images, and takes them through the real commands, each in its own process
as a user runs them: `attribution index`, `attribution learn-weights` (a few queries) and
`attribution serve` (one query over HTTP). It reports per stage the seconds, the peak resident
memory of the driver and of each kind of Ray worker (actors, tasks, replicas), and beside them
the model's load and fingerprint time, the index's bytes per example and k_total, and the
featurize / training-step time ratio on the loaded model.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypedDict

import yaml

from attribution_core.config import FeaturizeConfig, ProjectionConfig, TimestepConfig
from attribution_core.data.writers import synthetic_rows, write_synthetic
from attribution_core.features.featurize import Featurizer
from attribution_core.index.store import IndexStore
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.tiny import build_sd15_pipeline
from pipelines.bench.featurize import _batch, _timed, _train_step
from pipelines.bench.serve import _free_port
from pipelines.output import print_result

ROOT = Path(__file__).resolve().parents[2]


class TreeMemory:
    """Peak resident memory of a process and all its descendants, by role, sampled every
    ``period_s``: the driver itself, each Ray worker by its process title (``ray::Name``), and
    Ray's own daemons together."""

    def __init__(self, pid: int, period_s: float = 0.2) -> None:
        import psutil

        self._psutil, self.root, self.period_s = psutil, psutil.Process(pid), period_s
        self.peak_mb: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _role(self, proc) -> str:
        if proc.pid == self.root.pid:
            return "driver"
        try:
            title = " ".join(proc.cmdline())
        except (self._psutil.Error, OSError):
            return "other"
        if title.startswith("ray::"):
            name = title.split()[0][len("ray::"):]
            return f"ray::{name.split('.')[0] if name else 'idle'}"
        return "ray_daemons" if re.search(r"\bray\b|raylet|gcs_server", title) else "other"

    def sample(self) -> None:
        totals: dict[str, float] = {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            return
        for proc in procs:
            try:
                rss = proc.memory_info().rss / 2**20
            except (self._psutil.Error, OSError):
                continue
            role = self._role(proc)
            # Workers of one role: the largest single process (what one needs); daemons: their sum.
            totals[role] = totals.get(role, 0.0) + rss if role == "ray_daemons" else max(totals.get(role, 0.0), rss)
        for role, mb in totals.items():
            self.peak_mb[role] = max(self.peak_mb.get(role, 0.0), round(mb, 1))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


class Stage(TypedDict):
    """One real command run to completion: its time, its process tree's peak memory, its JSON."""

    seconds: float
    peak_rss_mb: float
    result: dict[str, Any]


class ServeStage(TypedDict, total=False):
    """``attribution serve`` started, one query answered, stopped."""

    ready_s: float
    query_ms: float
    server_timing_ms: dict[str, float] | None
    answered_aspects: list[str]
    seconds: float
    peak_rss_mb: float


class ModelCosts(TypedDict):
    model_load_s: float
    fingerprint_s: float
    unet_parameters: int
    text_encoder_parameters: int
    vae_parameters: int
    variants: dict[str, str]
    k_total: int
    tracked_layers: int
    featurize_s_per_example: float
    train_step_s: float
    featurize_vs_train_step: float
    peak_rss_mb: float


class ScaleReport(TypedDict, total=False):
    """``bench scale``: the SD-1.5-sized pipeline, its costs, and every stage run on it."""

    examples: int
    timesteps: int
    resolution: int
    latents: int
    work: str
    build_s: float
    model_bytes_on_disk: int
    model: ModelCosts
    index: dict[str, Any]
    stages: dict[str, Stage | ServeStage]
    total_s: float


def run_stage(name: str, args: list[str], timeout_s: float) -> Stage:
    """Run one real command to completion, its JSON result and its memory by role."""
    started = time.perf_counter()
    proc = subprocess.Popen(_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    with TreeMemory(proc.pid) as memory:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise RuntimeError(f"`attribution {' '.join(args)}` ({name}) exited {proc.returncode} after {seconds} s:\n{tail}")
    try:
        result = json.loads(out)
    except json.JSONDecodeError:
        result = {"stdout": out.strip()[-2000:]}
    return Stage(seconds=seconds, peak_rss_mb=memory.peak_mb, result=result)


def serve_one_query(config: Path, url: str, body: bytes, timeout_s: float) -> ServeStage:
    """Start `attribution serve`, wait until it answers, send one query, stop it."""
    started = time.perf_counter()
    proc = subprocess.Popen(_command("serve", "--config", str(config)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    out: ServeStage = {}
    with TreeMemory(proc.pid) as memory:
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"`attribution serve` exited {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
                try:
                    urllib.request.urlopen(f"{url}/v1/index", timeout=5).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the endpoint did not answer within {timeout_s} s") from None
                    time.sleep(1.0)
            out["ready_s"] = round(time.perf_counter() - started, 1)
            request = urllib.request.Request(f"{url}/v1/attributions", data=body,
                                             headers={"Content-Type": "application/json"})
            sent = time.perf_counter()
            with urllib.request.urlopen(request, timeout=timeout_s) as r:
                answer = json.loads(r.read())
            out["query_ms"] = round((time.perf_counter() - sent) * 1000, 1)
            out["server_timing_ms"] = answer.get("timing_ms")
            out["answered_aspects"] = sorted(answer.get("aspects", {}))
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["peak_rss_mb"] = memory.peak_mb
    return out


def model_costs(model_dir: Path, timesteps: int) -> ModelCosts:
    """Load and fingerprint time of the model, and featurize / training-step seconds on one example."""

    started = time.perf_counter()
    adapter = load_adapter(model_dir)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    model_fingerprint(adapter)
    fingerprint_s = time.perf_counter() - started
    cfg = FeaturizeConfig(measurement="square", timesteps=TimestepConfig(count=timesteps),
                          projection=ProjectionConfig(k_in=8, k_out=8), max_rows_per_pass=timesteps)
    featurizer = Featurizer(adapter, cfg)
    batch = _batch(adapter, 1)
    timed = _timed({"featurize": lambda: featurizer.flat(batch), "train": _train_step(adapter, featurizer, batch)}, 1)
    return ModelCosts(
        model_load_s=round(load_s, 1), fingerprint_s=round(fingerprint_s, 1),
        unet_parameters=sum(p.numel() for p in adapter.denoiser.parameters()),
        text_encoder_parameters=sum(p.numel() for p in adapter.text_encoder.parameters()),
        vae_parameters=sum(p.numel() for p in adapter.vae.parameters()),
        variants=adapter.variants, k_total=featurizer.layout.k_total, tracked_layers=len(featurizer.layout.layers),
        featurize_s_per_example=round(timed["featurize"], 2), train_step_s=round(timed["train"], 2),
        featurize_vs_train_step=round(timed["featurize"] / timed["train"], 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def _config(work: Path, model: Path, data: str, examples: int, *, timesteps: int, port: int) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.pop("train"), cfg.pop("subset_train")
    cfg["data"] = {"uri": data}
    cfg["model"] = {"path": str(model), "device": "auto"}
    cfg["featurize"].update(timesteps={"count": timesteps, "strategy": "uniform"}, max_rows_per_pass=timesteps,
                            groups={"preset": "function"})
    cfg["index"].update(out=str(work / "index"), batch_size=examples, actors=1, cpus_per_actor=1, threads_per_actor=0,
                        damping_queries=2, damping_grid=[0.01, 1.0], kernel="objective")
    cfg["weights"].update(aspects=["general"], queries_per_aspect=2, sample_steps=2, pool_size=examples, top_k=2,
                          max_rounds=1, steps=20, workers=1, holdout_queries=0, validation_queries=0)
    cfg["serve"].update(port=port, partitions=1, featurizer_replicas=1, cpus_per_replica=1, threads=0,
                        default_aspects=["general"], max_image_pixels=512 * 512 * 4)
    path = work / "scale.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(work: Path, examples: int, timesteps: int, timeout_s: float) -> ScaleReport:

    report: ScaleReport = {"examples": examples, "timesteps": timesteps, "resolution": 512, "latents": 64,
                           "work": str(work)}
    started = time.perf_counter()
    model = work / "model"
    if not (model / "model_index.json").is_file():
        build_sd15_pipeline(model, variant="fp16")
    report["build_s"] = round(time.perf_counter() - started, 1)
    report["model_bytes_on_disk"] = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    # In a process of its own, so that this one holds no model while the stages run.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        report["model"] = pool.submit(model_costs, model, timesteps).result()
    data = str(work / "data")
    if not Path(data).exists():
        write_synthetic(data, examples, seed=0, size=512)
    port = _free_port()
    config = _config(work, model, data, examples, timesteps=timesteps, port=port)
    stages: dict[str, Stage | ServeStage] = {}
    stages["index"] = run_stage("index", ["index", "--config", str(config), "--json"], timeout_s)
    built = stages["index"]["result"]
    manifest = IndexStore(built["uri"]).manifest(built["version"]) if "uri" in built else None
    if manifest is not None:
        shard_bytes = sum(s.bytes for s in manifest.shards)
        report["index"] = {"k_total": manifest.layout["k_total"], "rows": manifest.rows,
                           "bytes_per_example": round(shard_bytes / manifest.rows) if manifest.rows else None,
                           "kernel_choice": manifest.stats.get("kernel_choice", {}).get("kernel")}
    stages["learn_weights"] = run_stage("learn-weights", ["learn-weights", "--config", str(config), "--json"], timeout_s)
    query = next(iter(synthetic_rows(1, seed=77, size=512)))
    body = json.dumps({"image": base64.b64encode(query["image"]).decode(), "prompt": query["caption"], "k": 3}).encode()
    stages["serve"] = serve_one_query(config, f"http://127.0.0.1:{port}", body, timeout_s)
    report["stages"] = stages
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def main(args: argparse.Namespace) -> int:
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report = run(work, args.examples, args.timesteps, args.timeout)
    print_result(json.dumps(report, indent=2) if args.json else summary(report))
    return 0


def summary(report: ScaleReport) -> str:
    """The report as lines a person reads."""
    m, ix = report["model"], report["index"]
    lines = [
        f"Stable Diffusion 1.5-sized pipeline ({m['unet_parameters'] / 1e6:.0f} M UNet parameters, stored "
        f"{', '.join(sorted(set(m['variants'].values()))) or 'fp32'}), {report['examples']} images at 512x512, "
        f"{report['timesteps']} timesteps each",
        f"  model load {m['model_load_s']} s, fingerprint {m['fingerprint_s']} s; k_total {m['k_total']} "
        f"({m['tracked_layers']} layers); featurize {m['featurize_s_per_example']} s per example = "
        f"{m['featurize_vs_train_step']} training steps",
        f"  index: {ix['rows']} rows, {ix['bytes_per_example']} bytes per example, kernel {ix['kernel_choice']}",
    ]
    for name, stage in report["stages"].items():
        memory = ", ".join(f"{role} {mb / 1024:.1f} GiB" for role, mb in sorted(stage["peak_rss_mb"].items()))
        lines.append(f"  {name:<14} {stage['seconds']:>7} s   peak memory: {memory}")
    return "\n".join(lines)
