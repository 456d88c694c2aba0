"""The words a text model can read: prompts are checked against them before any work.

A model trained here reads captions through a word-level tokenizer built from its training
captions: a word it never saw is spelled letter by letter into tokens it never learned, and
the images it draws for such a prompt show nothing the prompt asked for. Learning queries
and endpoint requests with such words are refused, naming them, instead of answering from
noise. Models brought from elsewhere (a full CLIP vocabulary) are not checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from attribution_core.errors import UnknownWordsError

_WORD = re.compile(r"[a-z0-9]+")


def prompt_words(text: str) -> list[str]:
    """The words of ``text`` as the word-level tokenizer splits them (lowercase letters and
    digits; punctuation and spaces separate words)."""
    return _WORD.findall(text.lower())


def caption_vocabulary(captions: Iterable[str]) -> list[str]:
    """The sorted words of ``captions``: what a word-level tokenizer built from them spells
    as whole words."""
    return sorted({w for c in captions for w in prompt_words(c)})


def check_prompts(prompts: Iterable[str | None], vocabulary: frozenset[str] | None, where: str) -> None:
    """Raise ``UnknownWordsError`` listing every word of ``prompts`` outside ``vocabulary``
    (None: the model's vocabulary is not known, nothing is checked)."""
    if vocabulary is None:
        return
    unknown = sorted({w for p in prompts if p for w in prompt_words(p) if w not in vocabulary})
    if unknown:
        known = ", ".join(sorted(vocabulary)[:40]) + (", ..." if len(vocabulary) > 40 else "")
        raise UnknownWordsError(f"{where}: the model never saw {', '.join(repr(w) for w in unknown)} as a word in "
                                f"its training captions, so it cannot draw or read it; use its words ({known})")
