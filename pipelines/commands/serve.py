"""``attribution serve``: the attribution query endpoint on Ray Serve, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from pipelines.commands.options import add_base, add_config, add_ray_address


def _run(args: argparse.Namespace) -> int:
    from pipelines.serve.app import ServeArgs
    from pipelines.serve.runner import start, stop

    serve_args = ServeArgs(config=args.config, index=args.index, version=args.version, weights=args.weights,
                           model=args.model, base=args.base)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        url, info = start(serve_args, host=args.host, port=args.port, ray_address=args.ray_address)
        print(f"serving {info['uri']} version {info['version']} ({info['rows']} rows; aspects "
              f"{', '.join(info['aspects'])}) at {url}\n"
              f"  POST {url}/v1/attributions   GET {url}/v1/index   GET {url}/healthz   docs {url}/docs\n"
              "Ctrl-C stops.", flush=True)
        stopping.wait()
    finally:
        print("shutting down", flush=True)
        stop()
    return 0


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser(
        "serve", help="answer attribution queries over HTTP (Ray Serve) until Ctrl-C",
        description="Start the query endpoint: a FastAPI ingress, a featurizer holding the model (GPU when "
        "present) and index searchers holding the rows in memory. POST /v1/attributions with an image "
        "(base64 JSON or multipart), optional prompt, aspects and k returns the top-k training examples per "
        "aspect. Limits, replicas, batching and the optional API key come from the config's serve: section. "
        "For `serve run` / `serve deploy` use deploy/serve_config.yaml (same application builder).",
    )
    add_config(p, default_config)
    p.add_argument("--index", help="index root, path or s3:// (default: index.out of the config)")
    p.add_argument("--version", help="index version (default: the latest)")
    p.add_argument("--weights", help="weights artifact URI (default: <index>/versions/<v>/weights/<serve.weights>.json, "
                                     "else the nearest earlier version's with the same features)")
    p.add_argument("--model", help="model directory (default: model.path of the config)")
    add_base(p)
    p.add_argument("--host", help="address to bind (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: serve.port, 8000)")
    add_ray_address(p)
    p.set_defaults(func=_run)
