"""``attribution bench ...``: the benchmarks' command lines.

Each benchmark lives in ``pipelines.bench.<name>`` with its imports at the top (the index,
weights and serve stages, Ray Data / Train / Serve); its arguments are declared here, and
its module is imported only when that benchmark runs, so ``attribution --help`` and every
other command start without them. A benchmark whose ``--help`` is its module's docstring
reads it from the file, without importing the module.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from pipelines.commands.options import (add_base, add_config, add_json, add_ray_address, int_list, positive_float,
                                        positive_int)


def _runs(name: str) -> Callable[[argparse.Namespace], int]:
    """The ``main(args)`` of benchmark module ``pipelines.bench.<name>``, imported when called."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"pipelines.bench.{name}").main(args)

    return run


def _described(name: str) -> str:
    """The paragraph after the first line of ``pipelines.bench.<name>``'s docstring, as one line."""
    spec = importlib.util.find_spec(f"pipelines.bench.{name}")
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return doc.split("\n\n")[1].replace("\n", " ") if "\n\n" in doc else doc


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print JSON").add_subparsers(dest="bench_command",
                                                                                      required=True)
    for add in (_featurize, _quality, _index, _reindex, _weights, _serve, _search, _scale):
        add(bench, default_config)


def _featurize(bench: argparse._SubParsersAction, default_config: str) -> None:
    p = bench.add_parser("featurize", help="featurizer throughput vs a training step and a dense projection",
                         description="Time the Kronecker-factored featurizer against a plain training "
                         "step and exact per-example gradients with a dense projection, and check "
                         "it against the vmap reference.")
    p.add_argument("--scale", choices=("tiny", "sd15"), default="tiny",
                   help="'tiny': the demo-sized UNet (default, < 60 s on 2 CPUs); 'sd15': a "
                        "denoiser with Stable Diffusion 1.5's shapes and random weights, 64x64 "
                        "latents (minutes on CPU; dense and reference checks skipped)")
    p.add_argument("--examples", type=positive_int, default=None,
                   help="examples per batch (tiny: 16, as configs/demo.yaml; sd15: 1)")
    p.add_argument("--timesteps", type=positive_int, default=None,
                   help="timesteps per example (tiny: 10, as configs/demo.yaml; sd15: 1)")
    p.add_argument("--k", type=positive_int, default=8, help="k_in = k_out per layer (default 8)")
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="timed rounds after a warm-up, median reported (tiny; sd15 uses 1)")
    p.add_argument("--full-dense", action="store_true",
                   help="time the whole dense projection instead of extrapolating from its first blocks")
    add_json(p, "one JSON object")
    p.set_defaults(func=_runs("featurize"))


def _quality(bench: argparse._SubParsersAction, default_config: str) -> None:
    p = bench.add_parser("model-quality", help="attribute accuracy of generated images",
                         description=_described("quality"))
    p.add_argument("--model", required=True, help="model directory: a diffusers pipeline, or a LoRA folder (with --base)")
    add_base(p, "the base its lora.json names")
    p.add_argument("--data", help="its training dataset (default: the one named in the model's training.json)")
    p.add_argument("--combos", type=int, default=24, help="attribute combinations per set (default 24)")
    p.add_argument("--per-combo", type=int, default=8, help="images per combination (default 8)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default 3)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    p.add_argument("--classifier-epochs", type=int, default=15, help="epochs of the attribute classifier")
    p.add_argument("--seed", type=int, default=0, help="seed of combinations, classifier and sampling")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_json(p, "one JSON object")
    p.set_defaults(func=_runs("quality"))


def _index(bench: argparse._SubParsersAction, default_config: str) -> None:
    p = bench.add_parser("index", help="index job throughput with 1 and N actors, bytes/example, stage times",
                         description="Build the index of a synthetic dataset with 1 actor and with N actors "
                         "(featurize settings from the config) and print rows/s, scaling efficiency, bytes per "
                         "example, seconds per stage and an incremental update (as JSON with --json).")
    add_config(p, default_config, "featurize and index settings")
    p.add_argument("--n", type=int, default=1024, help="examples in the synthetic dataset (default 1024)")
    p.add_argument("--resolution", type=int, default=16, help="image side of the model (default 16)")
    p.add_argument("--widths", default="32,64", help="UNet widths of the model (default 32,64: the demo's)")
    p.add_argument("--actors", type=int, default=0, help="actors of the parallel run (default: the cluster's CPUs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor in both runs (default 1)")
    p.add_argument("--change", type=float, default=0.05, help="share of examples changed (and added) for the "
                   "incremental run (default 0.05)")
    p.add_argument("--work", help="folder for the dataset, model and indexes (default: a new temporary folder)")
    add_ray_address(p)
    add_json(p, "the result as one JSON object")
    p.set_defaults(func=_runs("index"))


def _reindex(bench: argparse._SubParsersAction, default_config: str) -> None:
    p = bench.add_parser("reindex", help="bytes of the dataset a reindex reads after a small addition",
                         description="Build the index of a Parquet dataset, add a share of new rows as one new "
                         "file and reindex; print seconds and dataset bytes read by each build, on a local folder "
                         "and on an S3-protocol server (moto's on 127.0.0.1 unless AWS_ENDPOINT_URL names one), "
                         "where a counting proxy measures the bytes served. Runs its own local Ray.")
    add_config(p, default_config, "featurize settings (the kernel is fixed block-diagonal: reads are measured)")
    p.add_argument("--n", type=positive_int, default=4000, help="rows of the dataset (default 4000)")
    p.add_argument("--rows-per-file", type=positive_int, default=100, help="rows per Parquet file (default 100)")
    p.add_argument("--add", type=positive_float, default=0.005, help="share of rows added before the reindex "
                   "(default 0.005)")
    p.add_argument("--resolution", type=positive_int, default=16, help="the model's image side (default 16)")
    p.add_argument("--image-size", type=positive_int, default=128, help="side of the stored images (default 128: "
                   "files of megabytes, as real datasets have, so Parquet footer reads are a small part)")
    p.add_argument("--where", choices=("local", "s3", "both"), default="both", help="storage to measure (default both)")
    p.add_argument("--bucket", default="attribution-bench", help="S3 bucket (default attribution-bench)")
    p.add_argument("--work", help="folder for the model, local dataset and index (default: a new temporary folder)")
    add_json(p, "the result as one JSON object")
    p.set_defaults(func=_runs("reindex"))


def _weights(bench: argparse._SubParsersAction, default_config: str) -> None:
    p = bench.add_parser("weights", help="weight learning: scan and optimisation time against N; aspect recall",
                         description="Time one mining scan (Ray Data) and one optimisation (Ray Train) for "
                         "--queries synthetic queries at each N in --sizes; with --index, measure Recall@k of each "
                         "aspect's attribute under learned aspect weights vs uniform (as JSON with --json).")
    add_config(p, default_config, "weights settings")
    p.add_argument("--sizes", default="10000,100000,1000000", help="index sizes N (default 10000,100000,1000000)")
    p.add_argument("--queries", type=int, default=1000, help="learning queries (default 1000)")
    p.add_argument("--groups", type=int, default=8, help="parameter groups of the synthetic features (default 8)")
    p.add_argument("--dim", type=int, default=32, help="features per group (default 32)")
    p.add_argument("--skip-scaling", action="store_true", help="only the recall measurement")
    p.add_argument("--index", help="index with learned weights (e.g. artifacts/demo/index) for Recall@k")
    p.add_argument("--eval-queries", type=int, default=96, help="evaluation queries for Recall@k (default 96)")
    p.add_argument("--eval-seed", type=int, default=424242, help="their generation seed (apart from weights.seed)")
    p.add_argument("--k", type=int, default=10, help="k of Recall@k (default 10)")
    add_ray_address(p)
    add_json(p, "the result as one JSON object")
    p.set_defaults(func=_runs("weights"))


def _serve(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser("serve", help="query endpoint latency and throughput vs N and concurrency",
                       description=_described("serve"))
    add_config(p, default_config)
    p.add_argument("--n", type=positive_int, nargs="+", default=[10_000, 100_000],
                   help="indexed rows per run (default 10000 100000)")
    p.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8],
                   help="client concurrency levels (default 1 8)")
    p.add_argument("--requests", type=positive_int, nargs="+", default=[60, 160],
                   help="requests per concurrency level, one number per --concurrency (default 60 160)")
    p.add_argument("--base", type=positive_int, default=256,
                   help="real examples indexed to draw synthetic rows from (default 256)")
    p.add_argument("--aspects", help="comma-separated aspects per request (default: serve.default_aspects)")
    p.add_argument("--k", type=positive_int, default=10, help="training examples per aspect asked for (default 10)")
    p.add_argument("--threads", type=int, help="torch threads of the featurizer (default: serve.threads; 0 = all CPUs)")
    p.add_argument("--weights-from", help="index whose learned weights to serve with (same features), "
                                          "e.g. artifacts/demo/index")
    p.add_argument("--work", help="folder for the indexes (default: a temporary one)")
    add_ray_address(p)
    add_json(p, "the result as one JSON object")
    p.set_defaults(func=_runs("serve"))


def _search(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser("search", help="exact vs approximate search: latency, recall@k, build time, memory",
                       description=_described("search"))
    add_config(p, default_config)
    p.add_argument("--index", help="index whose features the rows are drawn from (default: the config's index.out)")
    p.add_argument("--rows", type=int_list, default=[100_000, 1_000_000],
                   help="rows per run, comma-separated (default 100000,1000000; 10^6 rows of 5,312 "
                        "coordinates take 10.6 GB of disk and as much memory for the exact tier)")
    p.add_argument("--simulate", type=int, default=10_000_000,
                   help="rows of the simulated run (the largest run's codes repeated; 0 = none; default 10000000)")
    p.add_argument("--queries", type=positive_int, default=64, help="queries per run (default 64)")
    p.add_argument("--k", type=positive_int, default=10, help="rows per aspect; recall is recall@k (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rows, the queries and the quantisers (default 0)")
    p.add_argument("--code-bytes", type=int, default=0, help="bytes per row's code (default: one per 8 coordinates)")
    p.add_argument("--candidates", type=int, default=0, help="rows rescored per query (default: 1000)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch and FAISS threads, as in a searcher replica (serve.searcher_threads; default 1)")
    p.add_argument("--work", help="folder for the row files (default: the system's temporary directory)")
    add_json(p, "the result as one JSON object")
    p.set_defaults(func=_runs("search"))


def _scale(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser("scale", help="index -> learn-weights -> serve on a Stable Diffusion 1.5-sized pipeline",
                       description=_described("scale"))
    p.add_argument("--examples", type=positive_int, default=4, help="512x512 training images to index (default 4)")
    p.add_argument("--timesteps", type=positive_int, default=2, help="timesteps per example (default 2)")
    p.add_argument("--work", help="folder for the model, data and index (default: a new temporary folder; "
                                  "a folder from an earlier run reuses its model and data)")
    p.add_argument("--timeout", type=positive_float, default=3600, help="seconds allowed per stage (default 3600)")
    add_json(p, "the whole report as JSON")
    p.set_defaults(func=_runs("scale"))
