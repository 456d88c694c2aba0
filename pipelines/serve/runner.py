"""Deploying the application the declarative way (what ``serve deploy`` does), so that a
new index version or new weights reach running replicas through ``reconfigure``."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

from attribution_core.config import ProjectConfig
from attribution_core.index.opening import open_version
from attribution_core.index.store import IndexStore
from pipelines.failures import error_in_traceback
from pipelines.ray_runtime import ensure_ray
from pipelines.serve.app import APP_NAME, IMPORT_PATH, ServeArgs, featurizer_deployment, user_config
from pipelines.serve.protocol import IndexDescription

log = logging.getLogger(__name__)


def _local(path: str | None) -> str | None:
    """Absolute form of a local path (replicas and the build task need not share our cwd)."""
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


def application_config(args: ServeArgs, version: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """One entry of a Serve config's ``applications:``: init-time ``args`` plus per-deployment
    ``user_config`` holding what may be swapped (index, version, weights)."""
    cfg = ProjectConfig.load(args.config)
    build_args = {"config": _local(args.config), "index": _local(args.index or cfg.index.out),
                  "model": _local(args.model or cfg.model.path)}
    if args.base or cfg.model.base:
        build_args["base"] = _local(args.base or cfg.model.base)
    swap = user_config(cfg, ServeArgs(config=build_args["config"], index=build_args["index"],
                                      version=version if version is not None else args.version,
                                      weights=_local(weights if weights is not None else args.weights)))
    names = [featurizer_deployment(cfg.serve), *(f"IndexSearcher{p}" for p in range(cfg.serve.partitions))]
    app = {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": build_args,
           "deployments": [{"name": n, "user_config": swap} for n in names]}
    key_env = cfg.serve.api_key_env
    if key_env and key_env in os.environ:  # the ingress reads the key from its own environment
        app["runtime_env"] = {"env_vars": {key_env: os.environ[key_env]}}
    return app


def deploy(args: ServeArgs, host: str, port: int, *, version: str | None = None, weights: str | None = None) -> None:
    """Submit the application (first deploy, or a hot swap when only version/weights changed)."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    location = ProjectConfig.load(args.config).serve.proxy_location
    client = serve_start(http_options={"host": host, "port": port}, proxy_location=location)
    client.deploy_apps(ServeDeploySchema.model_validate(
        {"proxy_location": location, "http_options": {"host": host, "port": port},
         "applications": [application_config(args, version, weights)]}), _blocking=False)


def start(args: ServeArgs, *, host: str | None = None, port: int | None = None, ray_address: str | None = None,
          timeout_s: float = 300.0) -> tuple[str, IndexDescription]:
    """Deploy ``args``; returns the base URL and ``/v1/index`` once the endpoint answers."""
    cfg = ProjectConfig.load(args.config)
    host = host or cfg.serve.host
    port = port or cfg.serve.port
    open_version(IndexStore(args.index or cfg.index.out), args.version)  # missing or empty: refused here, not in a replica
    ensure_ray(ray_address)
    deploy(args, host, port)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    key = os.environ.get(cfg.serve.api_key_env) if cfg.serve.api_key_env else None
    return url, wait_ready(url, timeout_s, api_key=key)


def app_status() -> tuple[str, str]:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    return (str(app.status.value if hasattr(app.status, "value") else app.status), app.message) if app else ("NONE", "")


def wait_ready(url: str, timeout_s: float, *, version: str | None = None, api_key: str | None = None,
               watch_app: bool = True) -> IndexDescription:
    """Wait until ``/v1/index`` answers (from ``version`` on every partition when given). With
    ``watch_app`` (this process is connected to the endpoint's Ray), raise with Serve's message
    if the application fails to deploy; without it, only HTTP is used."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    headers = {"X-API-Key": api_key} if api_key else {}
    while time.monotonic() < deadline:
        status, message = app_status() if watch_app else ("", "")
        if status == "DEPLOY_FAILED":
            raise error_in_traceback(message) or RuntimeError(f"the endpoint failed to deploy:\n{message}")
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/index", headers=headers), timeout=10) as r:
                info = json.loads(r.read())
            if version is None or all(p["version"] == version for p in info["partitions"]):
                return info
            last = f"serving {info['version']}, waiting for {version}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc
        time.sleep(0.25)
    raise TimeoutError(f"the endpoint at {url} was not ready within {timeout_s:.0f} s ({last})")


def stop() -> None:
    """Shut the endpoint down; nothing to do when this process never joined Ray (``start``
    refused its input first), so a refusal does not start a Ray just to stop nothing."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
