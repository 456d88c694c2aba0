"""Partial captions: the training grammar that lets a model read prompts naming only some
attributes of an image (its subject, its style, its background).

A model trained only on captions that name every attribute ("a striped circle on a grid
background") has never seen "a striped shape", so aspect prompts are outside its language.
Attribute-level caption dropout (the tag dropout of common fine-tuning scripts) drops each
attribute's phrase with a probability while training, so every subset of the attributes is
a caption the model learns. Two ways to say what an attribute phrase is:

- a **caption template** over the dataset's attribute columns, e.g.
  ``"a {style} {subject|shape}[ on a {background} background]"``: ``{name}`` is the column's
  value, ``{name|word}`` falls back to ``word`` when ``name`` is dropped, and ``[...]`` is left
  out when the attributes inside it are dropped. "a" becomes "an" before a vowel;
- **comma-separated tags** in the caption itself ("striped, circle, grid background"), for
  datasets without attribute columns: each tag is an attribute phrase.

Aspect prompts for learning queries are written in the same grammar (``render_caption`` with
only that aspect kept), so they are captions the model was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from attribution_core.caption_grammar import OPTIONAL as _OPTIONAL
from attribution_core.caption_grammar import SLOT as _SLOT
from attribution_core.caption_grammar import template_attributes
from attribution_core.errors import InputError

def fix_articles(text: str) -> str:
    """One space between words, and "a"/"an" as the next word's first letter asks."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b(a|an) (\w)", lambda m: ("an " if m.group(2) in "aeiou" else "a ") + m.group(2), text)


def render_caption(template: str, values: Mapping[str, str | None]) -> str:
    """The caption ``template`` says for ``values`` (None or missing: dropped)."""
    def optional(m: re.Match) -> str:
        inner = m.group(1)
        used = [name for name, _ in _SLOT.findall(inner)]
        return inner if any(values.get(n) is not None for n in used) else ""

    def slot(m: re.Match) -> str:
        value = values.get(m.group(1))
        return str(value) if value is not None else (m.group(2) or "")

    return fix_articles(_SLOT.sub(slot, _OPTIONAL.sub(optional, template)))


def template_words(template: str) -> str:
    """The literal text of a template, fallbacks included (words the captions it renders
    may hold besides the attribute values)."""
    return _SLOT.sub(lambda m: m.group(2) or "", template).replace("[", " ").replace("]", " ")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def named_values(prompt: str, vocabulary: Mapping[str, Sequence[str]]) -> dict[str, str | None]:
    """Per attribute, the first of its values whose words all stand in ``prompt`` (in order),
    longest values first so "oil painting" wins over "painting"; None when none does."""
    words = " ".join(_words(prompt))
    out: dict[str, str | None] = {}
    for name, values in vocabulary.items():
        found = [v for v in sorted(values, key=len, reverse=True) if re.search(rf"\b{' '.join(_words(v))}\b", words)]
        out[name] = found[0] if found else None
    return out


def without_concept(prompt: str, concept: str, vocabulary: Mapping[str, Sequence[str]],
                    template: str | None = None) -> str:
    """``prompt`` with the words of its ``concept`` attribute removed, for Concept-TRAK's
    contrast ("a striped circle on a grid background" without subject: "a striped shape on a
    grid background" under the synthetic template). A prompt in the grammar of ``template``
    is said again in it without that attribute; any other prompt has the value's words cut
    out. ``InputError`` when the prompt names no value of ``concept``."""
    named = named_values(prompt, vocabulary)
    value = named.get(concept)
    if value is None:
        raise InputError(f"the prompt {prompt!r} names no {concept} ({', '.join(vocabulary.get(concept, ()))}); "
                         f"a contrastive {concept} query needs one")
    in_grammar = template and render_caption(template, named) == fix_articles(" ".join(_words(prompt)))
    if in_grammar:
        return render_caption(template, {n: v for n, v in named.items() if n != concept})
    return fix_articles(re.sub(rf"\b{re.escape(value)}\b", " ", prompt, flags=re.IGNORECASE))


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def keep_tags(caption: str, keep: Sequence[bool]) -> str:
    """The caption with the tags whose ``keep`` flag is False left out."""
    return ", ".join(t for t, k in zip(split_tags(caption), keep) if k)


class PartialCaptions:
    """Training captions with each attribute phrase dropped with probability ``p``.

    With ``template``, the phrases are the template's attributes, valued from the dataset's
    ``attributes`` columns; without it, the comma-separated tags of each caption. Which
    phrases a row keeps comes from the generator the caller passes, so training stays a
    function of its seed. A row that keeps every phrase gets its own caption unchanged.
    """

    def __init__(self, captions: Sequence[str], attributes: Mapping[str, Sequence], template: str | None,
                 p: float) -> None:
        self.captions, self.template, self.p = list(captions), template, p
        if template:
            self.names = template_attributes(template)
            missing = [n for n in self.names if n not in attributes]
            if missing:
                raise InputError(f"train.caption_template names {', '.join(missing)}, which the dataset has no "
                                 f"column for (columns: {', '.join(attributes) or 'none'})")
            self.values = [{n: attributes[n][i] for n in self.names} for i in range(len(self.captions))]
            self.width = len(self.names)
        else:
            self.tags = [split_tags(c) for c in self.captions]
            self.width = max((len(t) for t in self.tags), default=0)

    def draw(self, rows: Sequence[int], generator: torch.Generator) -> list[str]:
        """The captions of ``rows`` for one training step."""
        keep = (torch.rand(len(rows), max(1, self.width), generator=generator) >= self.p).tolist()  # [B, width]
        out = []
        for i, flags in zip(rows, keep):
            if self.template:
                if all(flags[: self.width]):
                    out.append(self.captions[i])
                else:
                    kept = {n: self.values[i][n] for n, k in zip(self.names, flags) if k}
                    out.append(render_caption(self.template, kept))
            else:
                out.append(keep_tags(self.captions[i], flags) if not all(flags[: len(self.tags[i])]) else self.captions[i])
        return out
