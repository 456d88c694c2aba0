"""The grammar of caption templates (``data.captions`` renders them): ``{name}`` slots,
``{name|word}`` fallbacks and ``[...]`` optional parts. Below the data layer because the
config checks a template when it is read."""

from __future__ import annotations

import re

from attribution_core.errors import ConfigError

SLOT = re.compile(r"\{(\w+)(?:\|([^}]*))?\}")
OPTIONAL = re.compile(r"\[([^\[\]]*)\]")


def template_attributes(template: str) -> list[str]:
    """The attribute names a template uses, in order of first use."""
    names: list[str] = []
    for name, _ in SLOT.findall(template):
        if name not in names:
            names.append(name)
    return names


def check_template(template: str, where: str) -> None:
    """``ConfigError`` naming ``where`` unless ``template`` has slots and balanced brackets."""
    if not template_attributes(template):
        raise ConfigError(f"{where}: the template {template!r} has no {{attribute}} slot")
    if template.count("[") != template.count("]") or OPTIONAL.sub("", template).count("[") \
            or "[" in "".join(OPTIONAL.findall(template)):
        raise ConfigError(f"{where}: the template {template!r} has unbalanced or nested [ ]")
