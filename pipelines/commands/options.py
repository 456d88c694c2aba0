"""Options that many commands share, declared once: ``--config``, ``--ray-address``, ``--json``."""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "configs/demo.yaml"


def add_config(p: argparse.ArgumentParser, default: str = DEFAULT_CONFIG, what: str = "YAML config",
               more: str = "") -> None:
    """``--config FILE``: ``what`` the command reads from it; ``more`` is added to the help."""
    p.add_argument("--config", default=default, help=f"{what} (default {default}){'; ' + more if more else ''}")


def add_ray_address(p: argparse.ArgumentParser, in_job: bool = False) -> None:
    """``--ray-address``: the Ray cluster to join (``in_job``: the command also runs as a Ray Job)."""
    where = "RAY_ADDRESS, set inside a Ray Job; else a local Ray" if in_job else "RAY_ADDRESS, else a local Ray"
    p.add_argument("--ray-address", help=f"Ray cluster to join (default: {where})")


def add_base(p: argparse.ArgumentParser, default: str = "model.base of the config") -> None:
    """``--base DIR``: the base pipeline of a LoRA model directory (diffusers' LoRA files)."""
    p.add_argument("--base", help="base pipeline directory of a LoRA --model that has no lora.json, e.g. your "
                   f"Stable Diffusion folder (default: {default})")


def add_json(p: argparse.ArgumentParser, what: str = "a JSON summary") -> None:
    """``--json``: print ``what`` (alone on stdout) instead of the text summary."""
    p.add_argument("--json", action="store_true", help=f"print {what} instead of the text summary")


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1 (a bad one exits 2 naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """An argparse ``type``: comma-separated whole numbers >= 1, e.g. ``32,64``."""
    return tuple(positive_int(part.strip()) for part in text.split(","))
