"""``tlframe sweep SWEEP.yaml``: a base config, a grid of overrides (and/or explicit variants), times seeds.

Sweep file (paths relative to the sweep file's folder)::

    base: ../digits/mnist2usps/source_only.yaml   # one config or a list (each passed as -c); may be left out
                                                  # when every point gets a config from a grid axis
    command: fit                                  # the tlframe subcommand (default fit)
    out: sweeps/my_sweep                          # output folder (relative to the current directory;
                                                  # default sweeps/<sweep file stem>; --out overrides)
    args: [--trainer.max_epochs=5]                # overrides given to every run
    grid:                                         # the cross product of the axes, in this order
      model.strategy.init_args.trade_off: [0.1, 1.0]      # a list: the axis is a CLI key
      strategy:                                           # a mapping: named values, each a set of overrides
        dann: {model.strategy: tlframe.strategies.DANN}
        mmd:  {model.strategy: tlframe.strategies.MMD, config: extra.yaml}   # config: one more -c file
    variants:                                     # optional: explicit points, crossed with the grid
      - {name: lr_small, model.lr: 0.001}
      - {name: lr_big, model.lr: 0.1}
    seeds: [0, 1, 2]                              # --seed_everything of each run (default [0])
    seed_args: ["--data.split_seed={seed}"]       # more per-seed overrides ({seed} is replaced)
    needs: [runs/pretrain/version_0/checkpoints/last.ckpt]   # files that must exist before a run starts
                                                  # (relative to the current directory; also allowed in
                                                  # a grid value or variant: needs: file)
    env: {TLFRAME_DATA_ROOT: ../shared/data}      # extra environment of the runs (not hashed)
    slurm: [--gres=gpu:1, --time=02:00:00]        # extra #SBATCH lines for --slurm
    baselines:                                    # add each run's baselines as sibling runs (negative transfer):
      source_only: {}                             # same run with FineTune (only for strategies using the target)
      target_only: {labels_per_class: 10}         # FineTune on k labelled target train images per class
                                                  # (null: all); both also take args: [overrides]

Every run gets ``<out>/runs/<hash>/`` where ``hash`` is the first 12 hex digits of the SHA-256 of its
resolved arguments (command, the contents of its config files, overrides, seed): the same arguments always
map to the same folder and an edited config file to a new one, so rerunning a sweep skips runs that hold
``done.json``, resumes interrupted ones from their ``last.ckpt`` and restarts failed ones from scratch (see
:mod:`tlframe.runs`). ``args.json`` (human-readable) and the run's TensorBoard events, checkpoints and
``output.log`` are in that folder. ``<out>/sweep.json`` lists every planned run (used by ``tlframe report``).

Baselines (see :mod:`tlframe.baselines`) are derived from each run's fully resolved config, written to
``<out>/baselines/<sha>.yaml`` and run like any point; a sibling is identified by the content of its config, so
points that share one (e.g. a trade-off axis: one source-only run per seed) share it, and a planned run with the
same config (a FineTune point of the grid) is used instead of a new run. Their point is the values of the axes
their runs agree on (``*`` elsewhere) plus ``baseline: source_only | target_only``; ``sweep.json`` records
each run's baseline hashes, which ``tlframe report`` compares with.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import queue
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tlframe.runs import (
    DONE, FAILED, RunLock, RunOutcome, RunSpec, execute_run, log_tail, worker_thread_env, write_json_atomic,
)

__all__ = ["SweepError", "Sweep", "Run", "load_sweep", "run_sweep", "slurm_script", "main"]

EXIT_OK, EXIT_FAILED_RUNS, EXIT_BAD_INPUT = 0, 1, 2
KEYS = {"base", "command", "out", "args", "grid", "variants", "seeds", "seed_args", "needs", "env", "slurm", "baselines"}
COMMANDS = {"fit", "validate", "test"}
HASH_LEN = 12


class SweepError(ValueError):
    """A sweep file or sweep option that cannot be used; the message names the problem and the fix."""


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (memoised per path, size and modification time)."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _DIGESTS[key]


def cli_value(value: Any) -> str:
    """A YAML value as jsonargparse reads it on the command line (``true``, ``null``, JSON for lists)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


@dataclass
class Choice:
    """One value of an axis: its label and what it adds to the command line."""

    label: str
    args: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One point of the sweep (one seed of one grid point)."""

    index: int
    point: dict[str, str]        # axis -> label, in axis order (seed not included)
    seed: int
    command: str
    configs: list[str]           # -c files, as resolved paths
    args: list[str]              # overrides (base args, grid, variant), then --seed_everything
    out: Path
    env: dict[str, str] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)
    root: Optional[Path] = None  # the sweep file's folder: config paths are hashed relative to it
    baseline: Optional[str] = None                           # a baseline sibling: its kind (source_only, ...)
    config_text: Optional[str] = None                        # a baseline sibling: its generated config (YAML)
    baselines: dict[str, str] = field(default_factory=dict)  # kind -> hash of this run's baseline sibling

    @property
    def key(self) -> dict[str, Any]:
        """What identifies the run (hashed): command, the **contents** of its config files (SHA-256, in order: an
        edited config is a new run, a moved or renamed one is not), overrides, seed. The environment and the
        output folder are not part of it."""
        if self.config_text is not None:
            configs = ["baseline:" + hashlib.sha256(self.config_text.encode()).hexdigest()]
        else:
            configs = [f"sha256:{file_sha256(c)}" for c in self.configs]
        return {"command": self.command, "configs": configs, "args": self.args, "seed": self.seed}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:HASH_LEN]

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.hash

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.point.items() if v != "") + f" seed={self.seed}"

    def argv(self) -> list[str]:
        """``python -m tlframe <command> -c ... <overrides>`` logging straight into the run directory."""
        configs = [a for c in self.configs for a in ("-c", c)]
        return [sys.executable, "-m", "tlframe", self.command, *configs, *self.args,
                f"--trainer.logger.init_args.save_dir={self.run_dir}", "--trainer.logger.init_args.name=",
                "--trainer.logger.init_args.version=", "--trainer.enable_progress_bar=false"]

    def info(self) -> dict[str, Any]:
        """``args.json``: the point, the seed, the hash and the full command."""
        return {"hash": self.hash, "index": self.index, "point": self.point, "seed": self.seed, **self.key,
                "config_files": self.configs,
                "env": self.env, "needs": self.needs, "argv": self.argv(),
                "command_line": " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
                + (" " if self.env else "") + shlex.join(self.argv())}


@dataclass
class Sweep:
    path: Path
    name: str
    out: Path
    runs: list[Run]
    axes: list[str]
    seeds: list[int]
    slurm: list[str]

    def manifest(self) -> dict[str, Any]:
        runs = []
        for r in self.runs:
            entry = {"hash": r.hash, "index": r.index, "point": r.point, "seed": r.seed}
            if r.baseline:
                entry["baseline"] = r.baseline
            if r.baselines:
                entry["baselines"] = r.baselines
            runs.append(entry)
        return {"sweep_file": str(self.path), "axes": self.axes, "seeds": self.seeds, "runs": runs}

    def write_manifest(self) -> None:
        """``<out>/sweep.json``, the planned runs, and the generated configs of the baseline runs; each left alone
        when it is already up to date (so that the array tasks of a SLURM job, which all start with it, do not
        write it at the same time)."""
        from tlframe.atomic import atomic_write_text

        for run in self.runs:
            if run.config_text is not None and not Path(run.configs[0]).is_file():
                atomic_write_text(run.configs[0], run.config_text)
        path, data = self.out / "sweep.json", self.manifest()
        try:
            if json.loads(path.read_text()) == data:
                return
        except (OSError, ValueError):
            pass
        write_json_atomic(path, data)


# --------------------------------------------------------------------------- loading
def _str_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise SweepError(f"{what} must be a string or a list of strings, got {value!r}")
    return [str(v) for v in value]


def _config_path(value: str, folder: Path, where: str) -> str:
    path = (folder / Path(value).expanduser()).resolve()
    if not path.is_file():
        raise SweepError(f"{where}: config file {value!r} not found (looked for {path}); paths are relative to "
                         "the sweep file's folder")
    return str(path)


def _overrides(mapping: dict, folder: Path, where: str) -> tuple[list[str], list[str], list[str]]:
    """``{key: value, config: file, needs: file}`` -> (``--key=value`` arguments, config files, needed files)."""
    args, configs, needs = [], [], []
    for key, value in mapping.items():
        if key == "config":
            configs += [_config_path(c, folder, where) for c in _str_list(value, f"{where}: config")]
        elif key == "needs":
            needs += _str_list(value, f"{where}: needs")
        else:
            args.append(f"--{str(key).removeprefix('--')}={cli_value(value)}")
    return args, configs, needs


def _axis(name: str, values: Any, folder: Path) -> list[Choice]:
    where = f"grid axis {name!r}"
    if isinstance(values, dict):
        if not values:
            raise SweepError(f"{where} has no values: give at least one")
        choices = []
        for label, mapping in values.items():
            if mapping is None:
                mapping = {}
            if not isinstance(mapping, dict):
                raise SweepError(f"{where}: value {label!r} must be a mapping of overrides (key: value), got {mapping!r}")
            choices.append(Choice(str(label), *_overrides(mapping, folder, f"{where} value {label!r}")))
        return choices
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where} must be a non-empty list of values (or a mapping of named values), got {values!r}")
    if name == "config":
        return [Choice(Path(v).stem, [], [_config_path(v, folder, where)]) for v in _str_list(values, where)]
    return [Choice(cli_value(v), [f"--{name.removeprefix('--')}={cli_value(v)}"]) for v in values]


def _variants(values: Any, folder: Path) -> list[Choice]:
    if not isinstance(values, list) or not values:
        raise SweepError(f"variants must be a non-empty list of mappings (name: ..., key: value), got {values!r}")
    choices = []
    for i, v in enumerate(values):
        if not isinstance(v, dict):
            raise SweepError(f"variant {i} must be a mapping of overrides, got {v!r}")
        v = dict(v)
        label = str(v.pop("name", i))
        choices.append(Choice(label, *_overrides(v, folder, f"variant {label!r}")))
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise SweepError(f"variant names must be unique, got {labels}")
    return choices


def _baselines(value: Any, path: Path) -> dict[str, dict[str, Any]]:
    """``baselines: [source_only, target_only]`` or ``{source_only: {args: [...]}, target_only: {labels_per_class: 10}}``."""
    from tlframe.baselines import BASELINES

    where = f"sweep file {path}: baselines"
    if isinstance(value, list):
        value = {str(v): {} for v in value}
    if not isinstance(value, dict) or not value:
        raise SweepError(f"{where} must be a list of {list(BASELINES)} or a mapping kind: {{options}}, got {value!r}")
    out = {}
    for kind, options in value.items():
        if kind not in BASELINES:
            raise SweepError(f"{where}: unknown baseline {kind!r}; use {list(BASELINES)}")
        options = {} if options in (None, True) else options
        if not isinstance(options, dict):
            raise SweepError(f"{where}: {kind} takes a mapping of options (args, labels_per_class), got {options!r}")
        allowed = {"args"} | ({"labels_per_class"} if kind == "target_only" else set())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise SweepError(f"{where}: {kind} has unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        k = options.get("labels_per_class")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise SweepError(f"{where}: target_only labels_per_class must be a positive integer or null (all labels), "
                             f"got {k!r}")
        out[kind] = {"args": _str_list(options.get("args") or [], f"{where}: {kind} args"), "labels_per_class": k}
    return out


def _identity(config: dict[str, Any]) -> str:
    """What makes two resolved configs the same run: everything but where the logger writes (a sweep sets that)."""
    config = json.loads(json.dumps(config))
    logger = ((config.get("trainer") or {}).get("logger") or {})
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        for k in ("save_dir", "name", "version"):
            logger["init_args"].pop(k, None)
    return json.dumps(config, sort_keys=True)


def add_baselines(runs: list[Run], options: dict[str, dict[str, Any]], out_dir: Path) -> list[Run]:
    """``runs`` followed by their baseline siblings (see :mod:`tlframe.baselines`); sets each run's ``baselines``."""
    from tlframe.baselines import source_only_config, target_only_config
    from tlframe.checks import ConfigError
    from tlframe.cli import resolved_config

    derive = {"source_only": lambda c, o: source_only_config(c),
              "target_only": lambda c, o: target_only_config(c, o["labels_per_class"])}
    by_identity: dict[tuple, Run] = {}
    resolved = {}
    for run in runs:
        try:
            resolved[run.index] = resolved_config([run.command, *(a for c in run.configs for a in ("-c", c)), *run.args])
        except Exception as err:  # noqa: BLE001 - any parse problem stops the sweep with its message
            raise SweepError(f"run {run.label!r}: its config cannot be resolved to derive its baselines: "
                             f"{err if isinstance(err, ConfigError) else repr(err)}") from None
        by_identity[(run.command, _identity(resolved[run.index]), tuple())] = run
    siblings: dict[tuple, tuple[Run, list[Run]]] = {}
    for run in runs:
        for kind, opts in options.items():
            config = derive[kind](resolved[run.index], opts)
            if config is None:
                continue
            logger = (config.get("trainer") or {}).get("logger")
            if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
                logger["init_args"].update(save_dir="runs", name="", version="")
            identity = (run.command, _identity(config), tuple(opts["args"]))
            if identity in by_identity:          # the grid already has this run
                run.baselines[kind] = by_identity[identity].hash
                continue
            if identity not in siblings:
                text = yaml.safe_dump(config, sort_keys=False)
                sha = hashlib.sha256(text.encode()).hexdigest()[:HASH_LEN]
                sibling = Run(index=-1, point={}, seed=run.seed, command=run.command,
                              configs=[str(out_dir / "baselines" / f"{sha}.yaml")],
                              args=opts["args"] + [f"--seed_everything={run.seed}"], out=out_dir, env=run.env,
                              needs=list(run.needs), root=run.root, baseline=kind, config_text=text)
                siblings[identity] = (sibling, [])
            siblings[identity][1].append(run)
            run.baselines[kind] = siblings[identity][0].hash
    axis_values = {a: list(dict.fromkeys(r.point[a] for r in runs)) for a in (runs[0].point if runs else {})}
    extra, labels = [], set()
    for (_, identity, _), (sibling, users) in siblings.items():
        point = {}
        for a, values in axis_values.items():
            used = [v for v in values if any(u.point[a] == v for u in users)]
            point[a] = "*" if len(used) == len(values) > 1 else "|".join(used)
        sibling.point = {**point, "baseline": sibling.baseline}
        label = json.dumps([sibling.point, sibling.seed], sort_keys=True)
        if label in labels:  # two different siblings that the axes cannot tell apart: name them by config (not seed)
            config = json.loads(identity)
            config.pop("seed_everything", None)
            tag = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:6]
            sibling.point["baseline"] = f"{sibling.baseline}#{tag}"
        labels.add(label)
        sibling.index = len(runs) + len(extra)
        extra.append(sibling)
    for run in runs:
        run.point["baseline"] = ""
    return runs + extra


def load_sweep(path: str | os.PathLike, out: Optional[str] = None) -> Sweep:
    """Read and check a sweep file; expand it into its runs (grid order, seeds innermost)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"sweep file {path} must be a mapping with keys {sorted(KEYS)}")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise SweepError(f"sweep file {path}: unknown key(s) {unknown}; allowed keys: {sorted(KEYS)}")
    folder = path.parent
    base = [_config_path(c, folder, "base") for c in _str_list(spec.get("base") or [], "base")]
    command = spec.get("command", "fit")
    if command not in COMMANDS:
        raise SweepError(f"sweep file {path}: command must be one of {sorted(COMMANDS)}, got {command!r}")
    fixed = _str_list(spec.get("args") or [], "args")
    grid = spec.get("grid")
    if grid is not None and (not isinstance(grid, dict) or not grid):
        raise SweepError(f"sweep file {path}: grid is empty: give a mapping of axis: [values], or drop it")
    axes = [(str(name), _axis(str(name), values, folder)) for name, values in (grid or {}).items()]
    if "variants" in spec:
        axes.append(("variant", _variants(spec["variants"], folder)))
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"sweep file {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"sweep file {path}: seeds repeat: {seeds}")
    env = spec.get("env") or {}
    if not isinstance(env, dict):
        raise SweepError(f"sweep file {path}: env must be a mapping NAME: value, got {env!r}")
    env = {str(k): os.path.expandvars(str(v)) for k, v in env.items()}
    seed_args = _str_list(spec.get("seed_args") or [], "seed_args")
    needs = _str_list(spec.get("needs") or [], "needs")
    slurm = _str_list(spec.get("slurm") or [], "slurm")
    out_dir = Path(out or spec.get("out") or Path("sweeps") / path.stem).expanduser().resolve()
    runs = []
    for combo in itertools.product(*[choices for _, choices in axes]):
        if not base and not any(c.configs for c in combo):
            raise SweepError(f"sweep file {path}: no config file for the point "
                             f"{ {name: c.label for (name, _), c in zip(axes, combo)} }: give 'base' (a config "
                             "file, or a list of them), or a 'config' in every value of a grid axis")
        for seed in seeds:
            runs.append(Run(
                index=len(runs), point={name: c.label for (name, _), c in zip(axes, combo)}, seed=seed,
                command=command, configs=base + [f for c in combo for f in c.configs],
                args=fixed + [a for c in combo for a in c.args] + [f"--seed_everything={seed}"]
                + [a.replace("{seed}", str(seed)) for a in seed_args],
                out=out_dir, env=env, needs=needs + [f for c in combo for f in c.needs], root=folder))
    hashes = {}
    for r in runs:
        if r.hash in hashes:
            raise SweepError(f"sweep file {path}: runs {hashes[r.hash].label!r} and {r.label!r} have the same "
                             "arguments: make the axis values differ")
        hashes[r.hash] = r
    names = [name for name, _ in axes]
    if spec.get("baselines"):
        if "baseline" in names:
            raise SweepError(f"sweep file {path}: 'baseline' names the baselines' axis: rename the grid axis 'baseline'")
        runs = add_baselines(runs, _baselines(spec["baselines"], path), out_dir)
        names.append("baseline")
    return Sweep(path, path.stem, out_dir, runs, names, seeds, slurm)


# --------------------------------------------------------------------------- running
def run_one(run: Run) -> RunOutcome:
    """Run one point (skipped when its ``done.json`` exists); ``args.json`` is written before it starts.

    An interrupted ``fit`` point resumes from its ``checkpoints/last.ckpt`` (:func:`tlframe.runs.execute_run`)."""
    info = run.info()
    spec = RunSpec(run.run_dir, run.argv(), env=run.env, needs=[Path(p) for p in run.needs],
                   header=info["command_line"], first_files={"args.json": info},
                   checkpoint=run.run_dir / "checkpoints" / "last.ckpt" if run.command == "fit" else None)
    return execute_run(spec, extra={"hash": run.hash, "point": run.point, "seed": run.seed})


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Prints ``[done/total] status run (ETA)`` lines; thread-safe."""

    def __init__(self, total: int, workers: int, stream=None) -> None:
        self.total, self.workers, self.stream = total, workers, stream or sys.stdout
        self.finished, self.walls = 0, []
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            print(text, file=self.stream, flush=True)

    def start(self, run: Run) -> None:
        self.say(f"[{self.finished}/{self.total}] running {run.hash} ({run.label})")

    def end(self, run: Run, outcome: RunOutcome) -> None:
        with self.lock:
            self.finished += 1
            if outcome.status not in ("skipped", "busy"):
                self.walls.append(outcome.wall_s)
            left = self.total - self.finished
            eta = ""
            if self.walls and left:
                eta = f", ETA {_fmt_s(sum(self.walls) / len(self.walls) * left / self.workers)}"
            if outcome.status == "skipped":
                text = f"skipped {run.hash} ({run.label}): done.json found"
            elif outcome.ok:
                resumed = f" (resumed from {outcome.resumed_from})" if outcome.resumed_from else ""
                stale = (f"; its earlier result, for a changed command, kept at {outcome.superseded}"
                         if outcome.superseded else "")
                text = f"done {run.hash} ({run.label}) in {_fmt_s(outcome.wall_s)}{resumed}{stale}"
            elif outcome.status == "busy":
                text = f"skipped {run.hash} ({run.label}): {outcome.error}"
            else:
                tail = log_tail(run.run_dir / "output.log", 8)
                text = f"FAILED {run.hash} ({run.label}): {outcome.error}" + (f"\n{tail}" if tail else "")
            print(f"[{self.finished}/{self.total}] {text}{eta}", file=self.stream, flush=True)


def visible_gpus() -> list[str]:
    """GPU ids a worker can be pinned to (``CUDA_VISIBLE_DEVICES`` entries, else ``0..n-1``); [] without CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA: no pinning
        return []


def run_sweep(sweep: Sweep, workers: int = 1, gpus: Optional[list[str]] = None, stream=None,
              runs: Optional[list[Run]] = None) -> list[RunOutcome]:
    """Run ``runs`` (default: every point of ``sweep``), ``workers`` at a time, each running run pinned to one of ``gpus``."""
    sweep.write_manifest()
    runs = sweep.runs if runs is None else runs
    progress = Progress(len(runs), workers, stream)
    done_before = sum((r.run_dir / DONE).is_file() for r in runs)
    progress.say(f"tlframe sweep: {len(runs)} runs ({done_before} already done) into {sweep.out}, "
                 f"{workers} worker{'s' if workers > 1 else ''}" + (f", GPUs {','.join(gpus)}" if gpus else ""))
    free: "queue.Queue[str]" = queue.Queue()
    for g in gpus or []:
        free.put(g)
    threads = worker_thread_env(workers)
    for run in runs:
        run.env = {**threads, **run.env}

    def work(run: Run) -> RunOutcome:
        if (run.run_dir / DONE).is_file():
            outcome = run_one(run)
        else:
            gpu = free.get() if gpus else None
            try:
                if gpu is not None:
                    run.env = {**run.env, "CUDA_VISIBLE_DEVICES": gpu}
                progress.start(run)
                outcome = run_one(run)
            finally:
                if gpu is not None:
                    free.put(gpu)
        progress.end(run, outcome)
        return outcome

    if workers <= 1:
        outcomes = [work(r) for r in runs]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcomes = list(pool.map(work, runs))
    n_failed = sum(o.status == "failed" for o in outcomes)
    n_busy = sum(o.status == "busy" for o in outcomes)
    progress.say(f"tlframe sweep: {sum(o.ok for o in outcomes)}/{len(outcomes)} runs finished, {n_failed} failed"
                 + (f", {n_busy} running in another process" if n_busy else "") + f"; table: tlframe report {sweep.out}")
    return outcomes


def slurm_script(sweep: Sweep, extra: Sequence[str] = (), python: str = sys.executable) -> str:
    """A SLURM job-array script: array task i runs ``tlframe sweep <file> --index i`` (finished runs are skipped)."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=tlframe-{sweep.name}", f"#SBATCH --array=0-{len(sweep.runs) - 1}",
             f"#SBATCH --output={sweep.out / 'slurm'}/%A_%a.log"]
    lines += [f"#SBATCH {s}" for s in [*sweep.slurm, *extra]]
    lines += [
        "# One grid point per array task; multi-GPU / multi-node per run is Lightning's job (--trainer.devices,",
        "# --trainer.num_nodes in the sweep's args). Resubmitting skips the runs that hold done.json.",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(sweep.out / 'slurm'))}",
        f"cd {shlex.quote(os.getcwd())}",
        shlex.join([python, "-m", "tlframe", "sweep", str(sweep.path), "--out", str(sweep.out), "--index"])
        + " \"$SLURM_ARRAY_TASK_ID\"",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tlframe sweep", description=__doc__.split("\n\n")[0].replace("``", ""),
                                epilog="Sweep file format: see README 'Sweeps and reports' or tlframe/sweep.py.")
    p.add_argument("sweep_file")
    p.add_argument("--out", help="output folder (overrides the sweep file's 'out')")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--gpus", default="auto",
                   help="GPU ids to pin running runs to, one GPU per run (comma list), 'none', or 'auto' "
                        "(the visible GPUs when --workers > 1; default); at most one run per GPU at a time")
    p.add_argument("--index", type=int, help="run only the run with this index (a SLURM array task)")
    p.add_argument("--slurm", metavar="FILE.sbatch", help="write a SLURM job-array script instead of running")
    p.add_argument("--slurm-option", action="append", default=[], metavar="OPT",
                   help="an extra #SBATCH option for --slurm (repeatable), e.g. --slurm-option=--gres=gpu:1")
    p.add_argument("--list", action="store_true", help="print the runs (index, hash, status, point) and exit")
    return p.parse_args(argv)


def _status(run: Run) -> str:
    if (run.run_dir / DONE).is_file():
        return "done"
    if RunLock(run.run_dir).holder() is not None:
        return "running"
    if (run.run_dir / FAILED).is_file():
        try:
            interrupted = json.loads((run.run_dir / FAILED).read_text()).get("interrupted")
        except (OSError, ValueError):
            interrupted = False
        return "unfinished" if interrupted else "failed"
    return "unfinished" if run.run_dir.exists() else "not run"


def check_grid_names(sweep: Sweep, runs: Sequence[Run]) -> None:
    """Parse one run of every grid point as ``tlframe`` would, before any run starts: a key, option or class path
    that does not exist (a misspelled grid key) stops the sweep with one line. Bad values are left to their run,
    which fails and is recorded like any other failed run."""
    from tlframe.cli import unknown_name_error

    checked: set[str] = set()
    for run in runs:
        if run.config_text is not None:  # a baseline: its config was resolved from a checked run
            continue
        point = json.dumps(run.point, sort_keys=True)
        if point not in checked:
            checked.add(point)
            error = unknown_name_error([run.command, *(a for c in run.configs for a in ("-c", c)), *run.args])
            if error:
                raise SweepError(f"sweep file {sweep.path}, run {run.label!r}: {error}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.workers < 1:
            raise SweepError(f"--workers must be >= 1, got {args.workers}")
        sweep = load_sweep(args.sweep_file, args.out)
        if args.index is not None and not 0 <= args.index < len(sweep.runs):
            raise SweepError(f"--index {args.index} is out of range: the sweep has runs 0..{len(sweep.runs) - 1}")
        if not args.list:
            check_grid_names(sweep, [sweep.runs[args.index]] if args.index is not None else sweep.runs)
    except SweepError as err:
        print(f"tlframe sweep: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.list:
        for r in sweep.runs:
            print(f"{r.index:4d}  {r.hash}  {_status(r):10s}  {r.label}")
        return EXIT_OK
    if args.slurm:
        from tlframe.atomic import atomic_write_text

        sweep.write_manifest()
        (sweep.out / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
        atomic_write_text(args.slurm, slurm_script(sweep, args.slurm_option))
        print(f"tlframe sweep: wrote {args.slurm} ({len(sweep.runs)} array tasks); submit with: sbatch {args.slurm}")
        return EXIT_OK
    if args.gpus == "none":
        gpus: list[str] = []
    elif args.gpus == "auto":
        gpus = visible_gpus() if args.workers > 1 else []
    else:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    runs = [sweep.runs[args.index]] if args.index is not None else None
    outcomes = run_sweep(sweep, args.workers, gpus, runs=runs)
    return EXIT_FAILED_RUNS if any(o.status == "failed" for o in outcomes) else EXIT_OK
