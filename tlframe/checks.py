"""Argument checks shared by the modules, strategies and the CLI: one clear ``ValueError`` per bad value.

A value out of range raises :class:`ConfigError` (a ``ValueError``) naming the argument, the value, the
allowed range and the fix; the ``tlframe`` command prints it as one ``tlframe: error:`` line (exit 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

__all__ = ["ConfigError", "check_number", "check_checkpoint_file", "check_writable_folder"]


class ConfigError(ValueError):
    """A config value, option or file that tlframe cannot use; the message says why and the fix."""


def check_number(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number in the range (NaN and inf never pass).

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``integer`` also requires a whole number.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    span = " and ".join(p for p in (lo, hi) if p)
    kind = "a whole number" if integer else "a finite number"
    raise ConfigError(f"{name}={value!r} must be {kind}{' ' + span if span else ''}")


def check_checkpoint_file(path: str, option: str = "--ckpt_path") -> None:
    """Raise :class:`ConfigError` unless ``path`` is a readable tlframe (Lightning) checkpoint.

    Names the case: missing, truncated or unreadable, not a Lightning checkpoint (a plain state dict,
    which ``model.weights`` takes), or a Lightning checkpoint of another model (no ``backbone.``/``head.``
    tensors). A checkpoint of another tlframe configuration is reported when it is loaded
    (:class:`tlframe.module.CheckpointMismatchError`, naming the tensors that differ).
    """
    import torch

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{option} {path}: no such file: pass an existing checkpoint, e.g. "
                          "runs/<name>/version_N/checkpoints/last.ckpt")
    try:
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as err:  # an old (non-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle garbage, a text file, ...
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        raise ConfigError(f"{option} {path} cannot be read as a checkpoint ({detail}): it is truncated, corrupt or "
                          "not a checkpoint; copy it again completely, or use another checkpoint of the run "
                          "(e.g. its last.ckpt)") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        looks = ("a plain state dict of tensors" if isinstance(ckpt, dict) and ckpt
                 and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}")
        raise ConfigError(f"{option} {path} is not a Lightning checkpoint (no 'state_dict'; it holds {looks}): "
                          f"{option} resumes or evaluates a tlframe run's checkpoint; to start from these weights "
                          f"pass --model.weights={path} instead")
    keys = list(ckpt["state_dict"])
    if not any(k.startswith(("backbone.", "head.")) for k in keys):
        example = ", ".join(repr(k) for k in keys[:3]) or "none"
        raise ConfigError(f"{option} {path} was not written by tlframe (its state_dict has no backbone./head. tensors; "
                          f"first keys: {example}): pass a checkpoint of a tlframe run, or --model.weights=<file> to "
                          "start a new run from a backbone's weights")


def check_writable_folder(folder: str, option: str) -> None:
    """Raise :class:`ConfigError` if ``folder`` cannot be created or written (checked before anything is written)."""
    import os

    path = Path(folder).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option}={folder}: cannot create it, {probe} is a file, not a folder: choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={folder}: {probe} is not writable (permission denied): choose a folder you can "
                          "write to")
