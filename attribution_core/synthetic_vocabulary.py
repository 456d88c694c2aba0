"""The attribute vocabulary of the synthetic sets (``data.synthetic`` draws them). Below the
data layer because the weights config's default aspect prompts name the same values."""

from __future__ import annotations

SUBJECTS = ("circle", "square", "triangle", "diamond", "cross", "ring")
STYLES = ("filled", "outlined", "striped", "dotted")
BACKGROUNDS = ("solid", "gradient", "grid", "noise")
