"""``tlframe rank``: which backbone, checkpoint or source model to start from, decided before any fine-tuning.

Each candidate runs once over the labelled images of a target data set (eval transform, no grad; the
features go through :class:`~tlframe.data.feature_cache.FeatureCache`, so a rerun reads them from disk)
and is scored by the functions of :mod:`tlframe.transferability`:

- from the backbone's features: LogME, H-score, regularised H-score (every candidate);
- from the source model's predictions on the target images: LEEP and NCE (candidates with a classifier:
  tlframe checkpoints, and timm models with ``pretrained: true`` whose classifier sits on the pooled features).

Usage::

    tlframe rank -c target.yaml --candidates candidates.yaml [--out ranking/] [--domain source] [--split train]

``target.yaml`` is any tlframe config (only its ``data`` section is read; ``--data.*`` overrides work): the
labelled set is the training split of ``data.source`` (what a fine-tuning run with that config trains on,
``source_samples_per_class`` included), or of ``data.target`` with ``--domain target``.
``candidates.yaml`` lists the models::

    candidates:
      - {name: mnist, checkpoint: runs/pretrain/version_0/checkpoints/last.ckpt}   # a tlframe run
      - {name: r50, backbone: resnet50, pretrained: true}                          # timm hub weights
      - {name: local, backbone: resnet50, weights: /models/resnet50.pth}           # a local state dict
      - {name: random, backbone: lenet}                                            # random init (a baseline)

Writes ``<out>/ranking.md`` and ``<out>/ranking.csv`` (ranked by ``--rank-by``, default LogME) and prints
the table. Bad input ends with one ``tlframe rank: error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from torch import nn

from tlframe.checks import ConfigError, check_checkpoint_file

__all__ = ["Candidate", "load_candidates", "score_candidate", "rank", "main"]

SCORES = ("logme", "leep", "nce", "hscore", "reg_hscore")
SCORE_TITLES = {"logme": "LogME", "leep": "LEEP", "nce": "NCE", "hscore": "H-score", "reg_hscore": "reg. H-score"}
EXIT_OK, EXIT_BAD_INPUT = 0, 2


@dataclass
class Candidate:
    """One model to score: a tlframe ``checkpoint``, or a timm ``backbone`` with ``pretrained``/``weights``."""

    name: str
    backbone: Optional[str] = None
    pretrained: bool = False
    weights: Optional[str] = None
    checkpoint: Optional[str] = None
    backbone_kwargs: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        """Where the weights come from, as a report shows it."""
        if self.checkpoint:
            return f"checkpoint {self.checkpoint}"
        if self.weights:
            return f"weights {self.weights}"
        return "timm pretrained" if self.pretrained else "random init"


def load_candidates(path: str) -> list[Candidate]:
    """Read and check ``candidates.yaml`` (a mapping with a ``candidates`` list, or the list itself)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"candidates file {path} does not exist: pass a YAML file listing the models to rank")
    try:
        spec = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"candidates file {path} is not valid YAML{where}: fix its syntax") from None
    items = spec.get("candidates") if isinstance(spec, dict) else spec
    if not isinstance(items, list) or not items:
        raise ConfigError(f"candidates file {path}: give a non-empty list 'candidates:' of models "
                          "(each with name and checkpoint, or name and backbone)")
    allowed = {f for f in Candidate.__dataclass_fields__}
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"candidates file {path}: entry {i} must be a mapping, got {item!r}")
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ConfigError(f"candidates file {path}: entry {i} has unknown key(s) {unknown}: allowed keys are "
                              f"{sorted(allowed)}")
        item = {"name": str(item.get("name") or item.get("backbone") or Path(str(item.get("checkpoint"))).stem), **item}
        cand = Candidate(**{**item, "name": str(item["name"])})
        if bool(cand.checkpoint) == bool(cand.backbone):
            raise ConfigError(f"candidates file {path}: candidate {cand.name!r} needs either 'checkpoint' (a tlframe "
                              "checkpoint) or 'backbone' (a timm name, with pretrained/weights), not both or neither")
        if cand.checkpoint:
            check_checkpoint_file(cand.checkpoint, f"candidate {cand.name!r}: checkpoint")
        out.append(cand)
    names = [c.name for c in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"candidates file {path}: names repeat: {repeated}: give every candidate its own name")
    return out


# --------------------------------------------------------------------------- building a candidate
@dataclass
class Built:
    backbone: nn.Module
    backbone_id: str
    classifier: Optional[Callable[[torch.Tensor], torch.Tensor]]  # features -> source logits, if the model has one
    source_classes: Optional[int]


def build(cand: Candidate) -> Built:
    """The candidate's headless backbone (timm, ``forward -> (N, D)``) and, where it has one, its classifier."""
    from tlframe.backbones import create_backbone
    from tlframe.heads import TransferHead

    if cand.checkpoint:
        ckpt = torch.load(cand.checkpoint, map_location="cpu", weights_only=False)
        hp = ckpt.get("hyper_parameters") or {}
        name = hp.get("backbone")
        if not name:
            raise ConfigError(f"candidate {cand.name!r}: checkpoint {cand.checkpoint} does not record its backbone "
                              "(no hyper_parameters.backbone): give backbone: and weights: instead")
        kwargs = dict(hp.get("backbone_kwargs") or {})
        if hp.get("_instantiator"):  # saved by tlframe's CLI: rebuild the module as trained (a strategy's own head too)
            from tlframe.module import TransferModule

            module = TransferModule.load_from_checkpoint(cand.checkpoint, map_location="cpu").eval()
            num_classes = int(hp["num_classes"])
            return Built(module.backbone, f"{name} {sorted(kwargs.items())}", lambda z: module.head(z)[1], num_classes)
        backbone = create_backbone(name, pretrained=False, **kwargs)
        state = ckpt["state_dict"]
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        num_classes = int(head_state["classifier.weight"].shape[0])
        head = TransferHead(backbone.num_features, num_classes, dim=int(hp.get("bottleneck_dim", 256)),
                            dropout=float(hp.get("bottleneck_dropout", 0.0)),
                            batch_norm=bool(hp.get("bottleneck_bn", True)),
                            layers=int(hp.get("bottleneck_layers", 1)))
        head.load_state_dict(head_state)
        head.eval()
        return Built(backbone, f"{name} {sorted(kwargs.items())}", lambda z: head(z)[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random init is a reproducible baseline (and its cached features are reused)
        backbone = create_backbone(cand.backbone, pretrained=cand.pretrained, weights=cand.weights,
                                   **cand.backbone_kwargs)
    classifier, classes = None, None
    if cand.pretrained and not cand.weights:
        import timm

        full = timm.create_model(cand.backbone, pretrained=True, **cand.backbone_kwargs)
        fc = full.get_classifier()
        if isinstance(fc, nn.Linear) and fc.in_features == backbone.num_features:
            classifier, classes = fc.eval(), fc.out_features
    return Built(backbone, f"{cand.backbone} {sorted(cand.backbone_kwargs.items())}", classifier, classes)


# --------------------------------------------------------------------------- scoring
def score_candidate(cand: Candidate, dm, domain: str = "source", split: str = "train",
                    cache_mode: str = "disk") -> dict[str, Any]:
    """Scores of one candidate on the labelled ``split`` of the data module's ``domain``.

    Returns ``{name, backbone, weights, dim, n, classes, seconds, logme, hscore, reg_hscore, leep, nce}``
    (``leep``/``nce`` are None without a source classifier).
    """
    from tlframe import transferability as T
    from tlframe.backbones import data_config
    from tlframe.data.datasets import TransformedDataset
    from tlframe.data.feature_cache import FeatureCache

    start = time.perf_counter()
    built = build(cand)
    dm.set_data_config(data_config(built.backbone))
    dm.setup("fit")
    raw = {("source", "train"): dm.source_train, ("source", "test"): dm.source_test,
           ("target", "train"): dm.target_train, ("target", "test"): dm.target_test}[(domain, split)]
    data = TransformedDataset(raw, dm.eval_transform(), dm.image_mode)
    cache = FeatureCache(cache_mode, built.backbone, built.backbone_id)
    dom = dm.source if domain == "source" else dm.target
    feats = cache.dataset(data, f"{dom!r} {domain} {split} rank", dm.eval_batch_size, dm.num_workers)
    features, labels = feats.tensors
    if (labels < 0).any():
        raise ConfigError(f"the {domain} {split} split has unlabelled images: ranking needs labels; choose a "
                          "labelled domain (--domain) or split (--split)")
    f64 = features.double().numpy()
    y = labels.numpy()
    row: dict[str, Any] = {"name": cand.name, "backbone": built.backbone_id.split(" ")[0], "weights": cand.source,
                           "dim": int(features.shape[1]), "n": int(features.shape[0]),
                           "classes": int(len(set(y.tolist()))), "source_classes": built.source_classes}
    row["logme"] = T.log_me(f64, y)
    row["hscore"] = T.h_score(f64, y)
    row["reg_hscore"] = T.regularized_h_score(f64, y)
    row["leep"] = row["nce"] = None
    if built.classifier is not None:
        with torch.no_grad():
            logits = torch.cat([built.classifier(chunk) for chunk in features.float().split(1024)])
        probs = logits.double().softmax(dim=1).numpy()
        row["leep"] = T.leep(probs, y)
        row["nce"] = T.negative_conditional_entropy(probs.argmax(axis=1), y)
    row["seconds"] = time.perf_counter() - start
    return row


def rank(rows: list[dict[str, Any]], by: str = "logme") -> list[dict[str, Any]]:
    """``rows`` sorted by the score ``by``, best first (missing scores last); adds ``rank``."""
    ordered = sorted(rows, key=lambda r: (r.get(by) is None, -(r.get(by) or 0.0)))
    return [{"rank": i + 1, **r} for i, r in enumerate(ordered)]


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def render(rows: list[dict[str, Any]], by: str, described: str) -> str:
    header = ["rank", "candidate", "backbone", "weights", "dim", *(SCORE_TITLES[s] for s in SCORES), "seconds"]
    lines = [f"# Transferability ranking ({described})", "",
             f"Ranked by {SCORE_TITLES[by]} (higher is better for every score). LEEP and NCE need the candidate's "
             "own classifier (n/a otherwise). One forward pass per candidate over the labelled images.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["rank"]), r["name"], r["backbone"], r["weights"], str(r["dim"]),
                 *(_fmt(r[s]) for s in SCORES), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["rank", "name", "backbone", "weights", "dim", "n", "classes", "source_classes", *SCORES, "seconds"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


# --------------------------------------------------------------------------- the command
def data_module(config: str, overrides: Sequence[str], command: str = "tlframe rank",
                options: str = "-c, --candidates, --out, --domain, --split, --rank-by, --cache"):
    """The ``data`` section of a tlframe config (plus ``--data.*`` overrides) as a TransferDataModule (a
    MultiDomainDataModule when it lists several domains: ``source`` / ``target`` are then its first source and its
    first target or held-out domain); ``command``
    and its ``options`` name the caller in the error about an unknown option."""
    from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

    from tlframe.cli_errors import explain, parser_keys
    from tlframe.data import TransferDataModule

    file = Path(config).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file {config} does not exist: pass a tlframe config with a data section to -c")
    try:
        spec = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError:
        spec = None
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), dict):
        raise ConfigError(f"{config} has no 'data:' section (or is not valid YAML): {command} reads the data "
                          "section of a tlframe config")
    bad = [a for a in overrides if not a.startswith("--data.")]
    if bad:
        raise ConfigError(f"unknown option {bad[0]} (on the command line): {command} takes {options} and --data.* "
                          "overrides")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    from tlframe.cli import MULTI_DOMAIN_KEYS
    from tlframe.data import MultiDomainDataModule

    several = any(k in spec["data"] for k in MULTI_DOMAIN_KEYS)  # its first source and first target are used
    parser.add_class_arguments(MultiDomainDataModule if several else TransferDataModule, "data")
    with tempfile.TemporaryDirectory() as tmp:
        only_data = Path(tmp) / file.name
        only_data.write_text(yaml.safe_dump({"data": spec["data"]}))
        argv = ["--config", str(only_data), *overrides]
        try:
            cfg = parser.parse_args(argv)
            return parser.instantiate_classes(cfg).data
        except ArgumentError as err:
            raise ConfigError(explain(str(err), [a.replace(str(only_data), str(file)) for a in argv],
                                      parser_keys(parser), command)) from None


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="tlframe rank", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("-c", "--config", required=True, help="a tlframe config: its data section gives the labelled set")
    p.add_argument("--candidates", required=True, help="YAML list of the models to rank")
    p.add_argument("--out", default="ranking", help="folder for ranking.md and ranking.csv (default: ./ranking)")
    p.add_argument("--domain", choices=["source", "target"], default="source",
                   help="which domain of the data section holds the labelled images (default: source)")
    p.add_argument("--split", choices=["train", "test"], default="train", help="which split of it (default: train)")
    p.add_argument("--rank-by", choices=SCORES, default="logme", help="the score that orders the table")
    p.add_argument("--cache", choices=["memory", "disk"], default="disk",
                   help="feature cache: disk (reused by the next run, default) or memory")
    return p.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    from tlframe.atomic import atomic_write_text
    from tlframe.backbones import BackboneError
    from tlframe.data import DataError

    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidates = load_candidates(args.candidates)
            dm = data_module(args.config, overrides)
            from tlframe.checks import check_writable_folder

            check_writable_folder(args.out, "--out")
            rows = []
            for cand in candidates:
                row = score_candidate(cand, dm, args.domain, args.split, args.cache)
                print(f"tlframe rank: {cand.name}: " + ", ".join(f"{SCORE_TITLES[s]} {_fmt(row[s])}" for s in SCORES),
                      flush=True)
                rows.append(row)
    except (ConfigError, DataError, BackboneError) as err:
        print(f"tlframe rank: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ranked = rank(rows, args.rank_by)
    described = f"{Path(args.config).name}, {args.domain} {args.split} split: {ranked[0]['n']} labelled images"
    text = render(ranked, args.rank_by, described)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ranking.md", text)
    atomic_write_text(out / "ranking.csv", to_csv(ranked))
    print(text, end="")
    print(f"tlframe rank: wrote {out / 'ranking.md'} and {out / 'ranking.csv'}")
    return EXIT_OK
