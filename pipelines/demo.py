"""``attribution demo``: the main job end to end on the embedded default.

Synthetic dataset -> train the small text-to-image model -> index the whole set on Ray
Data -> learn general and aspect weights on Ray Train -> evaluate (LDS with retrained
subset models when demo.lds, aspect Recall@K, the exemplar check, HTML report) -> start the query endpoint on Ray Serve,
send it a generated image, print the answer -> shut the endpoint down. Every step whose
result is already there (dataset, model, index version, weights, ground truth) is skipped.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import urllib.request
from pathlib import Path
from typing import Any, TypedDict

from attribution_core.config import ProjectConfig
from attribution_core.data.images import encode_png
from attribution_core.data.synthetic import caption_for
from attribution_core.models.sampling import generate
from attribution_core.seeding import stable_seed
from pipelines.evaluation.job import EvaluateRequest, evaluate
from pipelines.evaluation.summary import summary_text as evaluation_text
from pipelines.models import load_model
from pipelines.serve.app import ServeArgs
from pipelines.serve.runner import start, stop

# Query prompts of the demo: (subject, style, background).
SUBJECT_STYLE_BACKGROUND = (("circle", "filled", "grid"), ("triangle", "outlined", "solid"),
                            ("square", "striped", "gradient"), ("ring", "dotted", "noise"))

log = logging.getLogger(__name__)


def _port(host: str, wanted: int) -> int:
    """``wanted`` when it is free, else any free port (a demo should not fail on a busy 8000)."""
    with socket.socket() as s:
        try:
            s.bind((host, wanted))
            return wanted
        except OSError:
            s.bind((host, 0))
            port = s.getsockname()[1]
    log.warning("port %d is taken; the demo endpoint listens on %d", wanted, port)
    return port


class DemoAnswer(TypedDict):
    prompt: str | None
    answer: dict[str, Any]
    """The endpoint's JSON answer (``AttributionResponse``)."""


class DemoQueries(TypedDict):
    """The endpoint the demo started, the version it served, and its answers."""

    url: str
    version: str
    rows: int
    answers: list[DemoAnswer]


class DemoResult(TypedDict):
    evaluation: dict[str, Any]
    """``metrics.json``."""
    served: DemoQueries


def query_endpoint(cfg: ProjectConfig, config_path: str, aspects: list[str]) -> DemoQueries:
    """Start the endpoint, send ``demo.queries`` generated images, stop it; the answers."""
    adapter = load_model(cfg.model)
    prompts = [caption_for(*SUBJECT_STYLE_BACKGROUND[i % len(SUBJECT_STYLE_BACKGROUND)]) for i in range(cfg.demo.queries)]
    text = adapter.conditioning == "text"
    images = generate(adapter, prompts=prompts if text else None,
                      labels=[0] if adapter.conditioning == "class" else None, n=cfg.demo.queries,
                      seed=stable_seed("demo-queries", cfg.demo.seed))
    host = cfg.serve.host if cfg.serve.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url, info = start(ServeArgs(config=config_path), host=host, port=_port(host, cfg.serve.port))
    answers: list[DemoAnswer] = []
    try:
        for g in images:
            body: dict[str, Any] = {"image": base64.b64encode(encode_png(g.image)).decode(), "aspects": aspects,
                                    "k": cfg.demo.top_k}
            if text:
                body["prompt"] = g.prompt
            if adapter.conditioning == "class":
                body["label"] = g.label
            request = urllib.request.Request(f"{url}/v1/attributions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                answer = json.loads(r.read())
            answers.append(DemoAnswer(prompt=g.prompt, answer=answer))
    finally:
        stop()
    return DemoQueries(url=url, version=info["version"], rows=info["rows"], answers=answers)


def run(cfg: ProjectConfig, config_path: str) -> DemoResult:
    metrics = evaluate(cfg, EvaluateRequest(lds=cfg.demo.lds))
    learned = metrics["info"].get("aspects_learned", [])
    aspects = [a for a in ("general", "subject", "style", "background") if a in learned] or ["uniform"]
    served = query_endpoint(cfg, str(Path(config_path).resolve()), aspects)
    return DemoResult(evaluation=metrics, served=served)


def summary_text(result: DemoResult) -> str:
    metrics, served = result["evaluation"], result["served"]
    info = metrics["info"]
    built = info["index_build"]
    steps = metrics["stage_seconds"]
    prepared = info["prepared"]
    lines = [
        f"data             {info['data']} ({'written' if 'data' in prepared else 'present'})",
        f"model            {info['model']} ({'trained now' if 'model' in prepared else 'present'})",
        f"index            {built['uri']} version {built['version']}: "
        + ("up to date" if built["up_to_date"] else
           f"{built['mode']} build, {built['featurized']} examples featurized")
        + f"; {built['rows']} rows, {built['errors']} quarantined ({steps['index']} s)",
        f"weights          {', '.join(info['aspects_learned'])} "
        f"({'learned now' if info['weights_learned_now'] else 'present'}, {steps['weights']} s)",
        "evaluation       " + ", ".join(f"{part} {steps[part]} s" for part in ("exemplars", "recall", "lds")
                                            if part in steps),
        "",
        evaluation_text(metrics),
        "",
        f"endpoint         {served['url']} served version {served['version']} ({served['rows']} rows); "
        "one query sent, then shut down:",
    ]
    for a in served["answers"]:
        lines.append(f"  query: {a['prompt']}")
        substituted = a["answer"].get("substituted", {})
        for aspect, top in a["answer"]["aspects"].items():
            used = substituted.get(aspect)
            lines.append(f"    {aspect}:" + (f" (answered with the {used} weights)" if used else ""))
            for t in top:
                lines.append(f"      {t['rank']}. {t['score']:+.3e}  share {t['share']:.2f}  {t['example_id']}  "
                             f"{t.get('caption') or ''}")
    lines.append(f"\nreport           {Path(metrics['report']).resolve()}")
    return "\n".join(lines)
