"""The exemplar check (``evaluate.exemplars``): attribution by customization, on the model itself.

For each exemplar set (rows of the data sharing one value of a column, or a folder of the
user's images), the attributed model is fine-tuned briefly with LoRA on the set under the
set's prompt (a new word, ``evaluate.exemplars.token``), and the customized model generates
queries from that prompt: the exemplars caused them. Candidates are the exemplars (with the
prompt they were fine-tuned with, as the customized model's training data) among a seeded
sample of training rows (``distractors``, their own captions), all featurized under the
customized model with the index's featurize settings; the index's kernel and learned weights
score them. Recall@K and mAP of the exemplars are reported per set kind for every weighting
(uniform, learned general, each aspect's weights, the answer the endpoint serves for the
kind), the contrastive query (the prompt against the prompt without the token) and pixel
nearest neighbours, with bootstrap intervals over queries.

The control row asks the same of the world without the customization: the uncustomized
model's images for the same prompt, scored against the candidates as the index holds them
(their own captions, the model as indexed). It shows how much of the rate the customization
caused; a check whose control finds the exemplars as often measures nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from attribution_core.answers import UNIFORM
from attribution_core.config import ProjectConfig
from attribution_core.config_evaluate import ExemplarsConfig
from attribution_core.data.images import decode_image, encode_png
from attribution_core.data.readers import RawExample, read_examples
from attribution_core.errors import ConfigError, InputError
from attribution_core.evaluation.exemplar_sets import ExemplarSet, draw_sets, folder_sets
from attribution_core.evaluation.exemplars import exemplar_ranks, exemplar_values, summarize
from attribution_core.features.featurize import Featurizer
from attribution_core.index.kernel import damped_kernel
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.opening import version_featurizer
from attribution_core.index.reader import LoadedIndex
from attribution_core.index.scoring import preconditioned_queries
from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch
from attribution_core.models.customize import Customization, customize
from attribution_core.models.sampling import Generated, generate
from attribution_core.models.vocabulary import prompt_words
from attribution_core.seeding import content_id, stable_seed
from attribution_core.weights.artifact import unvalidated_choice, weights_matrix
from pipelines.evaluation.universe import BASES
from pipelines.models import manifest_model
from pipelines.weights.queries import featurize_generated

log = logging.getLogger(__name__)

SERVED, CONTRASTIVE, PIXEL, CONTROL = "served", "contrastive", "pixel_knn", "control"
BASIS_PREFIX = "basis:"  # columns of evaluate.exemplars.bases: "basis:trak"
"""Columns besides the weightings: the weighting the endpoint answers the set's kind with,
the contrastive query (uniform weights), pixel nearest neighbours, and the served answer
in the world without the customization."""


def served_weighting(document: dict[str, Any] | None, aspect: str) -> str:
    """The weighting the endpoint answers ``aspect`` with (uniform when it has no weights)."""
    learned = (document or {}).get("aspects", {})
    if aspect not in learned:
        return UNIFORM
    chosen = learned[aspect].get("answered_by", unvalidated_choice(aspect))
    return chosen if chosen == UNIFORM or chosen in learned else aspect


@dataclasses.dataclass
class _Context:
    """What every set shares: the model, the index, the candidate rows besides the exemplars."""

    cfg: ProjectConfig
    adapter: DiffusersAdapter
    index: LoadedIndex
    document: dict[str, Any]
    rows: list[RawExample]
    distractors: list[int]
    distractor_pixels: torch.Tensor
    weightings: list[str]
    base_featurizer: Featurizer | None = None

    @property
    def xcfg(self) -> ExemplarsConfig:
        return self.cfg.evaluate.exemplars

    def featurizer(self, adapter: DiffusersAdapter) -> Featurizer:
        return version_featurizer(adapter, self.index.manifest, self.cfg.featurize.max_rows_per_pass)

    def control_featurizer(self) -> Featurizer:
        """The uncustomized model's featurizer, reading the set's prompt (its token included)."""
        if self.base_featurizer is None:
            reader = copy.copy(self.adapter)  # the same modules; only the words it is checked against differ
            if reader.vocabulary is not None:
                reader.vocabulary = reader.vocabulary | set(prompt_words(self.xcfg.set_prompt))
            self.base_featurizer = self.featurizer(reader)
        return self.base_featurizer

    def pixels(self, images: list[bytes], names: list[str]) -> torch.Tensor:
        c, size = self.adapter.image_shape[0], self.adapter.image_shape[1]
        return torch.from_numpy(np.stack([decode_image(data, name, size, c) for data, name in zip(images, names)]))

    def label(self, row: RawExample) -> int:
        names = self.adapter.label_names or []
        value = str(row.attributes.get(self.index.manifest.dataset.get("label_column") or "label"))
        return names.index(value) if value in names else int(value)


@dataclasses.dataclass
class ExemplarPlan:
    """The check's sets, drawn before any model work so that bad settings stop it at once, and
    the dataset's rows they were drawn from (by example id)."""

    sets: list[ExemplarSet]
    examples: dict[str, RawExample]
    order: list[str]  # example ids in the order the sets' row numbers refer to


def plan_exemplars(cfg: ProjectConfig) -> ExemplarPlan:
    """Draw ``evaluate.exemplars``' sets from the dataset and list its folders' (``ConfigError``
    naming the setting when they cannot be drawn)."""
    xcfg = cfg.evaluate.exemplars
    if xcfg is None:
        raise ConfigError("evaluate.exemplars is not set: name data columns to draw exemplar sets from "
                          "(columns: {subject: subject}) or a folder of sets (folder: path)")
    examples = {e.example_id: e for e in read_examples(cfg.data.uri, cfg.train.caption_column,
                                                       image_column=cfg.data.image_column, id_column=cfg.data.id_column)}
    order = list(examples)
    sets: list[ExemplarSet] = []
    if xcfg.columns:
        names = {k for e in examples.values() for k in e.attributes}
        attributes = {name: [examples[i].attributes.get(name) for i in order] for name in names}
        sets += draw_sets(attributes, xcfg.columns, per_kind=xcfg.per_kind, size=xcfg.size, seed=cfg.evaluate.seed)
    if xcfg.folder is not None:
        sets += folder_sets(xcfg.folder, xcfg.kinds)
    return ExemplarPlan(sets=sets, examples=examples, order=order)


def _on_index(plan: ExemplarPlan, index: LoadedIndex) -> tuple[list[RawExample], list[ExemplarSet]]:
    """The index's rows (in its order) and the sets with row numbers into them; exemplars the
    index quarantined are left out of their set."""
    position = {eid: i for i, eid in enumerate(index.example_ids)}
    rows = [plan.examples[eid] for eid in index.example_ids]
    sets = []
    for s in plan.sets:
        kept = tuple(position[plan.order[r]] for r in s.rows if plan.order[r] in position)
        if s.rows and len(kept) < len(s.rows):
            log.warning("exemplar set %s: %d of its rows were quarantined by the index; checked with %d",
                        s.name, len(s.rows) - len(kept), len(kept))
            if not kept:
                raise InputError(f"exemplar set {s.name}: the index quarantined every one of its rows")
        sets.append(dataclasses.replace(s, rows=kept) if s.rows else s)
    return rows, sets


class SetInfo(TypedDict):
    """One exemplar set as the check reports it: where it came from and what answers its kind."""

    name: str
    kind: str
    size: int
    column: str | None
    value: Any
    served_by: str


class SetGallery(SetInfo):
    """The report's row of a set: its first query, its exemplars and the served top-k."""

    prompt: str | None
    image: bytes
    exemplars: list[bytes]
    first_exemplar_rank: int
    top: list[dict[str, Any]]


class SetCheck(TypedDict):
    set: SetInfo
    values: dict[str, Any]
    """Column -> ``exemplar_values`` (Recall@K and average precision per query)."""
    gallery: SetGallery


class ExemplarCheck(TypedDict):
    """``metrics.json``'s ``exemplar_check`` (the gallery goes to the report)."""

    k: int
    prompt: str | None
    distractors: int
    queries_per_set: int
    sets: list[SetInfo]
    table: dict[str, dict[str, Any]]
    served_by: dict[str, str]
    gallery: list[SetGallery]
    seconds: float


def run_exemplars(cfg: ProjectConfig, index: LoadedIndex, document: dict[str, Any] | None,
                  plan: ExemplarPlan | None = None) -> ExemplarCheck:
    """The check's tables per set kind and over all sets, its sets and gallery (``plan``:
    drawn here when not given)."""
    xcfg, ecfg = cfg.evaluate.exemplars, cfg.evaluate
    started = time.perf_counter()
    adapter = manifest_model(index.manifest, cfg.model.device)
    rows, sets = _on_index(plan or plan_exemplars(cfg), index)
    if adapter.conditioning == "class" and any(s.paths for s in sets):
        raise ConfigError("evaluate.exemplars.folder: a class-conditional model is customized with the exemplars' "
                          "labels, which folder sets do not have; draw sets from the label column "
                          "(columns: {general: label}) instead")
    taken = {r for s in sets for r in s.rows}
    pool = [i for i in range(len(rows)) if i not in taken]
    rng = random.Random(stable_seed("exemplar-distractors", ecfg.seed))
    distractors = sorted(rng.sample(pool, xcfg.distractors)) if 0 < xcfg.distractors < len(pool) else pool
    doc = document or {"groups": list(index.layout.group_names), "aspects": {}}
    ctx = _Context(cfg=cfg, adapter=adapter, index=index, document=doc, rows=rows, distractors=distractors,
                   distractor_pixels=torch.empty(0), weightings=[UNIFORM, *sorted(doc["aspects"])])
    ctx.distractor_pixels = ctx.pixels([rows[i].image for i in distractors], [rows[i].example_id for i in distractors])
    log.info("exemplar check: %d set(s) of %s among %d distractors, %d queries each", len(sets),
             "/".join(str(len(s)) for s in sets), len(distractors), xcfg.queries)
    results = []
    for n, s in enumerate(sets, 1):
        t0 = time.perf_counter()
        results.append(_check_set(ctx, s))
        values = results[-1]["values"]
        log.info("exemplar set %(n)d/%(sets)d %(name)s (%(kind)s): Recall@%(k)d served %(served).2f, control "
                 "%(control).2f (%(seconds).0f s)", {"n": n, "sets": len(sets), "name": s.name, "kind": s.kind,
                                                    "k": xcfg.k, "served": values[SERVED][0].mean(),
                                                    "control": values[CONTROL][0].mean(),
                                                    "seconds": time.perf_counter() - t0})
    kinds = sorted({s.kind for s in sets})
    return ExemplarCheck(k=xcfg.k, prompt=xcfg.set_prompt if adapter.conditioning == "text" else None,
                         distractors=len(distractors), queries_per_set=xcfg.queries,
                         sets=[r["set"] for r in results], table=_tables(results, ecfg.bootstrap, ecfg.seed),
                         served_by={kind: served_weighting(doc, kind) for kind in kinds},
                         gallery=[r["gallery"] for r in results][: max(ecfg.gallery, len(kinds))],
                         seconds=round(time.perf_counter() - started, 1))


def _exemplars(ctx: _Context, s: ExemplarSet) -> tuple[list[bytes], list[str], list[int] | None]:
    """The set's encoded images, their ids and (class models) their labels."""
    if s.rows:
        rows = [ctx.rows[r] for r in s.rows]
        labels = [ctx.label(r) for r in rows] if ctx.adapter.conditioning == "class" else None
        return [r.image for r in rows], [r.example_id for r in rows], labels
    images = [Path(p).read_bytes() for p in s.paths]
    return images, [content_id(data) for data in images], None


def _check_set(ctx: _Context, s: ExemplarSet) -> SetCheck:
    xcfg, ecfg, adapter = ctx.xcfg, ctx.cfg.evaluate, ctx.adapter
    text = adapter.conditioning == "text"
    prompt = xcfg.set_prompt
    images, ids, labels = _exemplars(ctx, s)
    pixels = ctx.pixels(images, ids)
    recipe = Customization(rank=xcfg.rank, targets=xcfg.targets, steps=xcfg.steps, batch_size=xcfg.batch_size,
                           learning_rate=xcfg.learning_rate, seed=stable_seed("exemplar-customization", ecfg.seed, s.name))
    custom = customize(adapter, pixels, recipe, captions=[prompt] * len(ids) if text else None,
                       labels=torch.tensor(labels) if labels is not None else None, words=[prompt] if text else (),
                       new_class=xcfg.token if labels is not None else None)
    asked = {"prompts": [prompt] if text else None, "n": xcfg.queries,
             "seed": stable_seed("exemplar-queries", ecfg.seed, s.name), "guidance": ctx.cfg.weights.guidance,
             "steps": ctx.cfg.weights.sample_steps}
    # A class model's new word is a new class (its last); without the customization, the exemplars' own classes.
    queries = generate(custom, labels=[adapter.num_classes] if labels is not None else None, **asked)
    control = generate(adapter, labels=labels, **asked)
    if labels is not None:  # the exemplars are the customized model's training data under the new class
        labels = [adapter.num_classes] * len(labels)
    featurizer = ctx.featurizer(custom)
    d = ctx.distractors
    batch = ExampleBatch(
        example_ids=tuple(ids) + tuple(ctx.rows[i].example_id for i in d), pixels=torch.cat([pixels, ctx.distractor_pixels]),
        captions=tuple([prompt] * len(ids) + [ctx.rows[i].caption for i in d]) if text else None,
        labels=torch.tensor(labels + [ctx.label(ctx.rows[i]) for i in d]) if labels is not None else None)
    candidates, unscaled = _features(featurizer, batch, ctx.index.manifest)
    is_exemplar = np.arange(candidates.shape[0]) < len(ids)
    columns = _scores(ctx, featurize_generated(featurizer, queries), candidates)
    if text:  # Concept-TRAK's query: what the token adds to the prompt
        contrast = featurize_generated(featurizer, queries, contrast=[_without(prompt, xcfg.token)] * len(queries))
        columns[CONTRASTIVE] = _scores(ctx, contrast, candidates, [UNIFORM])[UNIFORM]
    columns[SERVED] = columns[served_weighting(ctx.document, s.kind)]
    columns[PIXEL] = _pixel_scores(ctx, queries, torch.cat([pixels, ctx.distractor_pixels]))
    columns[CONTROL] = _control(ctx, s, control, ids, images=images)
    measured = {featurizer.cfg.measurement: (featurizer, candidates, unscaled)}  # each measurement featurized once
    for basis in xcfg.bases:  # each with uniform weights and a kernel of the candidates' own features
        columns[f"{BASIS_PREFIX}{basis}"] = _basis_scores(ctx, basis, batch, queries, measured=measured)
    values = {name: exemplar_values(scores, is_exemplar, xcfg.k) for name, scores in columns.items()}
    info = SetInfo(name=s.name, kind=s.kind, size=len(ids), column=s.column, value=s.value,
                   served_by=served_weighting(ctx.document, s.kind))
    gallery = _gallery(ctx, queries[0], images, columns[SERVED][0], is_exemplar=is_exemplar, info=info)
    return SetCheck(set=info, values=values, gallery=gallery)


def _without(prompt: str, token: str) -> str:
    return " ".join(w for w in prompt.split() if w != token)


def _features(featurizer: Featurizer, batch: ExampleBatch, manifest: IndexManifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-side features ``[B, k_total]`` as the index would hold them, rounded to its
    storage precision: times the row scale (DAS; what scores are taken against) and without
    it (what a kernel is built from)."""
    stored, scale = featurizer.flat_and_scale(batch)  # it runs the batch in passes of max_rows_per_pass
    if manifest.dtype == "float16":  # index.dtype: float16 | float32
        stored = stored.half().float()
    return (stored * scale[:, None] if scale is not None else stored), stored


def _basis_scores(ctx: _Context, basis: str, batch: ExampleBatch, queries: list[Generated],
                  *, measured: dict[str, tuple[Featurizer, torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Uniform-weight scores ``[Q, C]`` of one attribution basis under the customized model:
    its measurement's features (``measured``, keyed by measurement, filled as needed), its
    kernel (the index's block structure and damping) built from the candidates' rows, or none."""
    spec = BASES[basis]
    if spec.measurement not in measured:
        served = next(iter(measured.values()))[0]
        featurizer = Featurizer(served.adapter, dataclasses.replace(served.cfg, measurement=spec.measurement))
        measured[spec.measurement] = (featurizer, *_features(featurizer, batch, ctx.index.manifest))
    featurizer, candidates, stored = measured[spec.measurement]
    damping = float(ctx.index.manifest.stats["damping"])
    kernel = damped_kernel(stored, ctx.index.kernel, damping) if spec.kernel else None
    wq = preconditioned_queries(featurize_generated(featurizer, queries), weights_matrix(ctx.document, [UNIFORM]),
                                ctx.index.layout, kernel)
    return (wq[0] @ candidates.T).double().numpy()


def _scores(ctx: _Context, queries: torch.Tensor, candidates: torch.Tensor,
            weightings: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{weighting: scores [Q, C]}`` through the index's kernel."""
    names = weightings or ctx.weightings
    kernel = ctx.index.kernel if ctx.cfg.weights.use_kernel else None
    wq = preconditioned_queries(queries, weights_matrix(ctx.document, names), ctx.index.layout, kernel)
    return {name: (wq[a] @ candidates.T).double().numpy() for a, name in enumerate(names)}


def _pixel_scores(ctx: _Context, queries: list[Generated], candidates: torch.Tensor) -> np.ndarray:
    """Negative squared pixel distances ``[Q, C]``: pixel nearest neighbours as a score."""
    q = ctx.pixels([encode_png(g.image) for g in queries], [f"query {i}" for i in range(len(queries))])
    q, x = q.reshape(len(q), -1).double(), candidates.reshape(len(candidates), -1).double()
    return -(torch.cdist(q, x) ** 2).numpy()


def _control(ctx: _Context, s: ExemplarSet, control: list[Generated], ids: list[str], *,
             images: list[bytes]) -> np.ndarray:
    """The served answer's scores ``[Q, C]`` without the customization: the uncustomized
    model's images for the set's prompt against the candidates as indexed (a folder set's
    images, never indexed, with the prompt without the token)."""
    featurizer = ctx.control_featurizer()
    if s.rows:
        exemplars = ctx.index.features[list(s.rows)]
    else:
        prompt = _without(ctx.xcfg.set_prompt, ctx.xcfg.token)
        captions = (prompt,) * len(ids) if ctx.adapter.conditioning == "text" else None
        exemplars = _features(featurizer, ExampleBatch(example_ids=tuple(ids), pixels=ctx.pixels(images, ids),
                                                       captions=captions), ctx.index.manifest)[0]
    candidates = torch.cat([exemplars, ctx.index.features[ctx.distractors]])
    weighting = served_weighting(ctx.document, s.kind)
    return _scores(ctx, featurize_generated(featurizer, control), candidates, [weighting])[weighting]


def _gallery(ctx: _Context, query: Generated, images: list[bytes], scores: np.ndarray, *,
             is_exemplar: np.ndarray, info: SetInfo) -> SetGallery:
    """One row of the report: the set's first query, its exemplars, and the served answer's
    top-k candidates (each marked exemplar or not)."""
    k = ctx.cfg.evaluate.gallery_k
    top = np.argsort(-scores, kind="stable")[:k]
    n = int(is_exemplar.sum())
    rank = int(exemplar_ranks(scores[None], is_exemplar)[0, 0])
    return SetGallery(**info, prompt=query.prompt, image=encode_png(query.image), exemplars=images,
                      first_exemplar_rank=rank,
                      top=[{"image": images[j] if j < n else ctx.rows[ctx.distractors[j - n]].image,
                            "exemplar": bool(j < n), "score": float(scores[j]),
                            "caption": None if j < n else ctx.rows[ctx.distractors[j - n]].caption}
                           for j in top.tolist()])


def _tables(results: list[SetCheck], resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per set kind and, with several kinds, over all sets (``all``): every column's Recall@K
    and mAP, intervals over the queries, paired differences to uniform."""
    groups: dict[str, list[SetCheck]] = {}
    for r in results:
        groups.setdefault(r["set"]["kind"], []).append(r)
    if len(groups) > 1:
        groups["all"] = results
    out = {}
    for kind, members in groups.items():
        names = [n for n in members[0]["values"] if all(n in m["values"] for m in members)]
        per = {n: (np.concatenate([m["values"][n][0] for m in members]),
                   np.concatenate([m["values"][n][1] for m in members])) for n in names}
        out[kind] = summarize(per, resamples=resamples, seed=seed, reference=UNIFORM)
    return out
