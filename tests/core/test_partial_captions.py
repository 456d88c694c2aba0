"""Partial prompts in distribution: attribute-level caption dropout, the caption grammar the
aspect prompts share with training, and the refusal of words a model never read."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from attribution_core.config import TrainConfig, WeightsConfig
from attribution_core.data.images import encode_png
from attribution_core.data.captions import PartialCaptions, fix_articles, keep_tags, render_caption, template_words
from attribution_core.data.synthetic import BACKGROUNDS, STYLES, SUBJECTS, caption_for
from attribution_core.errors import ConfigError, InputError
from attribution_core.features.query import query_batch
from attribution_core.data.loading import TrainingData
from attribution_core.models.training import build_untrained, train_model
from attribution_core.models.vocabulary import UnknownWordsError, caption_vocabulary, check_prompts

TEMPLATE = "a {style} {subject|shape}[ on a {background} background]"


def test_the_template_says_every_synthetic_caption_and_every_partial_one():
    for su in SUBJECTS:
        for st in STYLES:
            for bg in BACKGROUNDS:
                assert render_caption(TEMPLATE, {"subject": su, "style": st, "background": bg}) == caption_for(su, st, bg)
    assert render_caption(TEMPLATE, {"style": "outlined"}) == "an outlined shape"
    assert render_caption(TEMPLATE, {"subject": "ring"}) == "a ring"
    assert render_caption(TEMPLATE, {"background": "grid"}) == "a shape on a grid background"
    assert render_caption(TEMPLATE, {"subject": "ring", "background": "noise"}) == "a ring on a noise background"
    assert keep_tags("striped, circle, grid background", [True, False, True]) == "striped, grid background"
    with pytest.raises(ConfigError, match="train.caption_template"):
        TrainConfig(caption_template="a [{style} [shape]]")
    with pytest.raises(ConfigError, match="no \\{attribute\\} slot"):
        TrainConfig(caption_template="a shape")


def _attrs(n: int) -> dict[str, list[str]]:
    return {"subject": ["ring"] * n, "style": ["outlined"] * n, "background": ["grid"] * n}


def test_attribute_dropout_honours_its_probability_and_seed():
    n = 4000
    captions = ["an outlined ring on a grid background"] * n
    partial = PartialCaptions(captions, _attrs(n), TEMPLATE, 0.3)
    drawn = partial.draw(list(range(n)), torch.Generator().manual_seed(7))
    again = partial.draw(list(range(n)), torch.Generator().manual_seed(7))
    other = partial.draw(list(range(n)), torch.Generator().manual_seed(8))
    assert drawn == again and drawn != other
    counts = Counter(drawn)
    # Each phrase kept with 0.7, independently: all three 0.343, none 0.027, one alone 0.063.
    assert abs(counts[captions[0]] / n - 0.343) < 0.03
    assert abs(counts["a shape"] / n - 0.027) < 0.01
    assert abs(counts["an outlined shape"] / n - 0.063) < 0.015
    style_kept = sum(c for cap, c in counts.items() if "outlined" in cap) / n
    assert abs(style_kept - 0.7) < 0.03
    tags = PartialCaptions(["striped, circle, grid"] * n, {}, None, 0.5).draw(list(range(n)), torch.Generator().manual_seed(0))
    assert abs(sum("circle" in t for t in tags) / n - 0.5) < 0.03 and "" in tags  # every tag can go
    with pytest.raises(InputError, match="names background, which the dataset has no column for"):
        PartialCaptions(captions, {"subject": [], "style": []}, TEMPLATE, 0.3)


def _data(n: int = 16) -> TrainingData:
    g = torch.Generator().manual_seed(0)
    caps = [caption_for(SUBJECTS[i % 6], STYLES[i % 4], BACKGROUNDS[i % 4]) for i in range(n)]
    attrs = {"subject": [SUBJECTS[i % 6] for i in range(n)], "style": [STYLES[i % 4] for i in range(n)],
             "background": [BACKGROUNDS[i % 4] for i in range(n)]}
    return TrainingData([f"e{i}" for i in range(n)], torch.rand((n, 3, 8, 8), generator=g) * 2 - 1, caps,
                        attributes=attrs)


def test_training_with_partial_captions_is_deterministic_and_reads_its_grammar():
    recipe = TrainConfig(resolution=8, widths=(8, 16), text_width=16, steps=3, batch_size=8, warmup_steps=1,
                         attribute_dropout=0.5, caption_template=TEMPLATE)
    a, b = train_model(_data(), recipe), train_model(_data(), recipe)
    assert a.losses == b.losses
    plain = train_model(_data(), TrainConfig(**{**recipe.__dict__, "attribute_dropout": 0.0}))
    assert plain.losses != a.losses  # the dropped phrases changed what was trained on
    assert {"shape", "ring", "background"} <= a.adapter.vocabulary


def test_default_aspect_prompts_are_in_the_trained_vocabulary_and_others_are_refused():
    vocabulary = frozenset(caption_vocabulary([caption_for(s, t, b) for s in SUBJECTS for t in STYLES
                                               for b in BACKGROUNDS] + [template_words(TEMPLATE)]))
    weights = WeightsConfig()
    for aspect, spec in weights.prompts.items():
        check_prompts([fix_articles(spec.template.format(value=v)) for v in spec.values], vocabulary, aspect)
    with pytest.raises(UnknownWordsError, match="weights.prompts.style: the model never saw 'something', 'thing' "):
        check_prompts(["something on a grid background", "a striped thing"], vocabulary, "weights.prompts.style")
    adapter = build_untrained(_data(), TrainConfig(resolution=8, widths=(8, 16), text_width=16,
                                                   attribute_dropout=0.3, caption_template=TEMPLATE))
    image = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
    assert query_batch(adapter, [image], prompts=["a striped shape"]).captions == ("a striped shape",)
    with pytest.raises(UnknownWordsError, match="prompt: the model never saw 'pikachu'"):
        query_batch(adapter, [image], prompts=["a pikachu on a grid background"])
    check_prompts(["anything at all"], None, "prompt")  # a model of unknown vocabulary is not checked
