"""Backbones: any timm model, built headless, with offline weight sources.

``create_backbone`` is the one door: ``timm.create_model(name, pretrained, num_classes=0)``,
then optionally a local weights file or a tlframe checkpoint from an earlier run.
``backbone_stages`` splits a backbone into ordered stages with timm's ``group_matcher``
(stage 0 is the stem), which is what stage freezing and layer-wise LR decay count in.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from torch import nn

from tlframe.backbones import digits  # noqa: F401  (registers lenet, lenet_tllib, dtn, dann_cnn in timm)

__all__ = ["BackboneError", "create_backbone", "load_backbone_weights", "load_head_weights", "backbone_stages",
           "data_config", "weight_source"]


class BackboneError(ValueError):
    """A backbone cannot be built or its weights cannot be loaded; the message says how to fix it."""


def create_backbone(name: str, pretrained: bool = False, weights: Optional[str] = None,
                    drop_path_rate: Optional[float] = None, **model_kwargs: Any) -> nn.Module:
    """Build a timm model without classifier (``num_classes=0``): ``forward`` gives ``(N, num_features)``.

    ``pretrained`` downloads the hub weights (needs internet). ``weights`` is the offline
    alternative: a state dict (``.pth``/``.pt``/``.bin``/``.safetensors``) or a Lightning
    checkpoint of a tlframe run, whose ``backbone.*`` weights are used.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise BackboneError(
            f"Unknown backbone '{name}'.{hint} Any name from timm.list_models() works, plus tlframe's "
            "digit networks 'lenet', 'lenet_tllib', 'dtn' and 'dann_cnn'."
        )
    if drop_path_rate is not None:
        model_kwargs["drop_path_rate"] = drop_path_rate
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        if not pretrained:
            raise
        raise BackboneError(
            f"Could not fetch pretrained weights for '{name}' ({type(err).__name__}: {err}). Without internet, "
            "set pretrained: false and weights: <path to a state dict or a tlframe checkpoint>."
        ) from err
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def weight_source(model: nn.Module, pretrained: bool = False, weights: Optional[str] = None) -> dict[str, Any]:
    """Where ``model``'s starting weights came from, exactly enough to tell two runs apart.

    ``{"kind": "timm", "tag": "resnet50.a1_in1k", "hub": ...}`` for hub weights (timm's pretrained tag),
    ``{"kind": "file", "path": ..., "sha256": ..., "bytes": ...}`` for a local weights file, plus ``"run"``
    (the run folder) when the file is a tlframe checkpoint in ``<run>/checkpoints/``, else ``{"kind": "random"}``.
    """
    import hashlib

    if weights is not None:
        file = Path(weights).expanduser().resolve()
        digest = hashlib.sha256()
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out: dict[str, Any] = {"kind": "file", "path": str(file), "sha256": digest.hexdigest(),
                               "bytes": file.stat().st_size}
        if file.parent.name == "checkpoints":
            out["run"] = str(file.parent.parent)
        return out
    if pretrained:
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        arch, tag = cfg.get("architecture"), cfg.get("tag")
        return {"kind": "timm", "tag": f"{arch}.{tag}" if tag else arch, "hub": cfg.get("hf_hub_id") or cfg.get("url")}
    return {"kind": "random"}


def describe_weight_source(source: dict[str, Any]) -> str:
    """One short string for tables: ``timm resnet50.a1_in1k``, ``file w.pth (sha256 1a2b3c4d5e6f)``, ``random init``."""
    if source.get("kind") == "timm":
        return f"timm {source.get('tag')}"
    if source.get("kind") == "file":
        where = f"run {Path(source['run']).name}/.../{Path(source['path']).name}" if source.get("run") else Path(source["path"]).name
        return f"{where} (sha256 {str(source.get('sha256'))[:12]})"
    return "random init"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, truncated files
        raise BackboneError(
            f"weights file {path} is not a readable PyTorch checkpoint or state dict ({type(err).__name__}: {err}). "
            "Point weights: at a .pth/.pt/.ckpt/.safetensors file saved by torch.save or by a tlframe run."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"weights file {path} holds no state dict of tensors; save one with torch.save(model.state_dict(), path).")
    return obj


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Find the prefix ('backbone.', 'module.', 'model.', ...) under which the model's keys live."""
    if any(k in model_keys for k in state):
        return state
    for prefix in ("backbone.", "module.backbone.", "model.backbone.", "module.", "model."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if any(k in model_keys for k in sub):
            return sub
    return state


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load a state dict or a tlframe checkpoint into a headless timm ``model``.

    Classifier weights of the source model are dropped; any other missing, unexpected or
    wrongly shaped tensor is an error that names the keys.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneError(f"weights file {file} does not exist; give the path of a state dict or of a tlframe checkpoint (e.g. <run dir>/checkpoints/last.ckpt).")
    target = model.state_dict()
    state = _strip_prefix(_read_state_dict(file), set(target))
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "fc"
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shape = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shape:
            parts.append("shape mismatch for " + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}" for k in shape[:3]))
        raise BackboneError(
            f"weights file {file} does not fit backbone '{getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__)}': "
            + "; ".join(parts) + ". Use the same backbone name (and in_chans) as the run that saved it."
        )
    model.load_state_dict(state)


def load_head_weights(head: nn.Module, path: str) -> None:
    """Load the ``head.*`` tensors (bottleneck and classifier) of a tlframe checkpoint into ``head``: the whole
    source model, e.g. to adapt it without the source data (SHOT). A checkpoint without them, or with another
    bottleneck width, number of classes or classifier kind, is an error that names the keys."""
    file = Path(path).expanduser()
    state = {k[len("head."):]: v for k, v in _read_state_dict(file).items() if k.startswith("head.")}
    target = head.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shape = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or shape:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}" for k in shape[:3])]))
        raise BackboneError(
            f"weights file {file}: its head (head.* tensors) does not fit this model's ({detail}). Use a tlframe "
            "checkpoint of a run with the same bottleneck_dim, weight_norm_classifier and classes, or set "
            "weights_head: false to load the backbone only.")
    head.load_state_dict(state)


def backbone_stages(model: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone grouped into stages, in forward order (stem first).

    Uses the model's coarse ``group_matcher`` (timm contract); a model without one is a
    single stage.
    """
    if not hasattr(model, "group_matcher"):
        return [[n for n, _ in model.named_parameters()]]
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def data_config(model: nn.Module) -> dict:
    """The model's input config (input_size, mean, std, interpolation, crop_pct) from timm.

    The channel count follows the model's first convolution, so ``in_chans=1`` on an RGB
    architecture (or 3 on a grey one) gives a matching config; a ViT built with another
    ``img_size`` gets that size.
    """
    cfg = dict(timm.data.resolve_model_data_config(model))
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = cfg["input_size"][0]
    if first_conv is not None and first_conv.in_channels != chans:
        chans = first_conv.in_channels
        cfg["input_size"] = (chans, *cfg["input_size"][1:])
        cfg["mean"] = (sum(cfg["mean"]) / len(cfg["mean"]),) * chans
        cfg["std"] = (sum(cfg["std"]) / len(cfg["std"]),) * chans
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)  # ViT-style fixed input size
    if fixed is not None and tuple(fixed) != tuple(cfg["input_size"][1:]):
        cfg["input_size"] = (cfg["input_size"][0], *fixed)
    return cfg
