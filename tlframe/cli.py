"""``tlframe fit | validate | test | predict -c config.yaml`` (LightningCLI), ``tlframe sweep``, ``tlframe report``."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ArgumentError, lazy_instance
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from tlframe.backbones import BackboneError
from tlframe.callbacks import (PredictionWriter, RunInfo, RunSummary, TransferCheckpoint, TransferEarlyStopping,
                                TransferInsights)
from tlframe.checks import ConfigError, check_checkpoint_file, check_writable_folder
from tlframe.cli_errors import UnknownNameError, config_error, explain, parser_keys, subcommand_parser
from tlframe.data import DataError, TransferDataModule
from tlframe.module import CheckpointMismatchError, NonFiniteLossError, TransferModule

__all__ = ["TLFrameCLI", "main"]


class TLFrameCLI(LightningCLI):
    """LightningCLI with tlframe's defaults.

    - ``model.num_classes`` is linked from ``data.num_classes``;
    - TensorBoard logger under ``runs/<name>/version_N`` (the resolved config is saved there);
    - checkpoints: ``last.ckpt`` (always the latest state, :class:`~tlframe.callbacks.TransferCheckpoint`)
      and the best by source validation accuracy (``checkpoint.*``), never by target labels;
    - per-parameter-group learning rates logged (``lr_monitor.*``);
    - ``tlframe predict`` writes ``predictions.csv`` into the run directory (``predictions.*``);
    - ``run_info.json`` (versions, git commits, command, seed, machine) next to ``config.yaml``;
    - TensorBoard diagnostics (``insights.*``): A-distance, target confusion image, projector
      snapshot, HParams record (:class:`~tlframe.callbacks.TransferInsights`).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(TransferCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/source_acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:03d}-step{step:06d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(RunInfo, "run_info")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(TransferInsights, "insights")
        parser.add_lightning_class_args(TransferEarlyStopping, "early_stopping")  # off unless early_stopping.enabled
        parser.set_defaults({"trainer.logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="tlframe")})

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # errors reach parse_arguments; no guessing of abbreviated options (--trainer.max_epoch is a typo)
        return super().init_parser(**{**kwargs, "exit_on_error": False, "allow_abbrev": False})

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, turning jsonargparse's usage dump into one line: :func:`tlframe.cli_errors.explain`."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
            command = argv[0] if argv and not argv[0].startswith("-") else None
            keys = parser_keys(subcommand_parser(parser, command))
            raise config_error(str(err), argv, keys, f"tlframe {command or ''}".strip()) from None

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning reads the hyperparameters in it (a truncated or foreign file
        ends in one line instead of ``OSError``/``KeyError`` tracebacks)."""
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt and ckpt not in ("best", "last", "hpc", "registry"):
            check_checkpoint_file(str(ckpt))
        parse = getattr(super(), "_parse_ckpt_path", None)
        if parse is not None:
            try:
                parse()
            except ArgumentError as err:
                raise ConfigError(f"the hyperparameters saved in {ckpt} do not fit this tlframe: "
                                  f"{explain(str(err), [])}") from None

    def _set_seed(self) -> None:
        """Lightning's seeding, with an out-of-range ``seed_everything`` as bad input (one line, not a traceback)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= 2**32 - 1:
            raise ConfigError(f"seed_everything={seed} is out of range: give an integer in [0, 4294967295] (or true "
                              "for a random seed)")
        super()._set_seed()

    def instantiate_classes(self) -> None:
        """Build the objects; a value they refuse (``ValueError``/``TypeError`` from an ``__init__``) is bad input.

        Then, before anything is written: the checkpoint of ``--ckpt_path`` is checked (readable, a tlframe
        run's), evaluations are pointed beside it, and the output folders must be writable.
        """
        _check_cpu_devices(self.config[self.subcommand] if self.subcommand else self.config)
        _source_free_monitor(self.config[self.subcommand] if self.subcommand else self.config)
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            root = _root_cause(err)
            if isinstance(root, BAD_INPUT_ERRORS) and not isinstance(root, ConfigError):
                raise root from None
            message = str(root).rstrip(". ")
            raise ConfigError(f"{_raised_in(root)}{message}: fix that value in the config or on the command line") from None
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt = config.get("ckpt_path")
        if ckpt and ckpt not in ("best", "last", "hpc", "registry"):
            check_checkpoint_file(str(ckpt))
        if self.subcommand in EVAL_SUBCOMMANDS:
            self._log_beside_checkpoint()
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                check_writable_folder(logger.log_dir, "trainer.logger.init_args.save_dir (the run folder)")
                if not Path(logger.log_dir).exists():
                    _NEW_RUN_DIRS.append(Path(logger.log_dir))
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)
        if self.subcommand == "predict" and writer is not None and writer.output_dir:
            check_writable_folder(writer.output_dir, "predictions.output_dir")

    def _log_beside_checkpoint(self) -> None:
        """``validate``/``test``/``predict --ckpt_path`` write into the checkpoint's run, not a new run.

        The TensorBoard logger is pointed at ``<run>/<subcommand>/<checkpoint name>/`` (``<run>``:
        the folder holding ``checkpoints/``), so ``config.yaml``, ``run_info.json``, the test scalars
        and ``predictions.csv`` land beside the model they evaluate, and no ``version_N`` with only
        a placeholder metric appears among the training runs. With ``trainer.logger: false`` the same folder
        becomes the trainer's ``default_root_dir`` (its ``log_dir`` without a logger), so those files still go
        beside the checkpoint instead of into the current directory.
        """
        ckpt = self.config[self.subcommand].get("ckpt_path")
        trainer = self.trainer
        if not ckpt or ckpt in ("best", "last", "hpc", "registry") or not Path(ckpt).is_file():
            return
        path = Path(ckpt)
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        loggers = [TensorBoardLogger(save_dir=str(run_dir), name=self.subcommand, version=path.stem,
                                     default_hp_metric=False) if isinstance(lg, TensorBoardLogger) else lg
                   for lg in trainer.loggers]
        trainer.loggers = loggers
        if not loggers:
            trainer._default_root_dir = str(run_dir / self.subcommand / path.stem)


def _check_cpu_devices(config) -> None:
    """A CPU run starts one process per device: more devices than CPUs is a typo, not a plan (Lightning would try to
    launch them all). One line instead of a machine brought to a halt."""
    trainer = config.get("trainer") or {}
    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int):
        return
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    cpus = os.cpu_count() or 1
    if on_cpu and devices > cpus:
        raise ConfigError(f"trainer.devices={devices}: this run is on the CPU ({cpus} CPUs, no GPU), where each device is "
                          f"a process: use at most {cpus} (or 'auto'), or run on a machine with GPUs")


#: Subcommands that evaluate a trained model (their logs go beside its checkpoint).
EVAL_SUBCOMMANDS = ("validate", "test", "predict")

#: Lightning messages that are not the user's business: an advertisement, and deprecations inside Lightning.
QUIET_MESSAGES = (r"💡 Tip", r".*isinstance\(treespec, LeafSpec\)", r"The dirpath has changed from",
                  r"You're resuming from a checkpoint that ended before the epoch")


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.match(p, str(record.getMessage())) for p in QUIET_MESSAGES)


def quiet_lightning() -> None:
    """Silence :data:`QUIET_MESSAGES` (as warnings and as Lightning's rank-zero log records)."""
    for pattern in QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages())


#: Run folders that this process's command is about to create (removed again if it stops on bad input).
_NEW_RUN_DIRS: list[Path] = []
#: What a run folder may hold when nothing of value was written yet.
_PLACEHOLDER_FILES = ("events.out.tfevents.*", "hparams.yaml", "config.yaml", "run_info.json")


def _root_cause(err: BaseException) -> BaseException:
    """The innermost ``ValueError``/``TypeError`` of ``err``'s chain (jsonargparse wraps what an ``__init__`` raised)."""
    while isinstance(err.__cause__ or err.__context__, (ValueError, TypeError)):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def _raised_in(err: BaseException) -> str:
    """``"DANN: "`` when ``err`` was raised inside a class's ``__init__`` (the innermost one), else ``""``."""
    tb, owner = err.__traceback__, ""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            owner = type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return f"{owner}: " if owner else ""


def remove_unused_run_dirs() -> None:
    """Delete the run folders this command created when they hold no checkpoint, metric or prediction yet:
    input rejected before training leaves no empty ``version_N`` behind. Rank 0 only."""
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) != 0:
        return
    for folder in _NEW_RUN_DIRS:
        if not folder.is_dir():
            continue
        files = [f for f in folder.rglob("*") if f.is_file()]
        if all(any(f.match(p) for p in _PLACEHOLDER_FILES) for f in files) and not any(
                f.name.startswith("events.out.tfevents") and f.stat().st_size > 4096 for f in files):
            shutil.rmtree(folder, ignore_errors=True)
    _NEW_RUN_DIRS.clear()


#: Exceptions that end ``tlframe`` with their message alone (no traceback) and an exit code.
BAD_INPUT_ERRORS = (ConfigError, DataError, BackboneError, CheckpointMismatchError, MisconfigurationException, FileNotFoundError)
EXIT_BAD_INPUT, EXIT_NON_FINITE = 2, 3


def error_message(err: BaseException) -> str:
    """The user-facing part of an error; an error raised in a DataLoader worker loses the worker's traceback dump."""
    text = str(err)
    if "Original Traceback" in text:  # re-raised by torch from a worker: keep the original message (its last line)
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    if isinstance(err, MisconfigurationException) and re.search(r"gpu|cuda", text, re.I) and not torch.cuda.is_available():
        text += (" No CUDA GPU is visible on this machine (torch.cuda.is_available() is False): run with "
                 "--trainer.accelerator=cpu (or auto) and --trainer.devices=1, or check the driver and CUDA_VISIBLE_DEVICES.")
    elif isinstance(err, FileNotFoundError) and "heckpoint" in text:
        text += ": pass an existing checkpoint, e.g. --ckpt_path=runs/<name>/version_N/checkpoints/last.ckpt."
    return text


class _ParseOnly(TLFrameCLI):
    """Parse a command's arguments without building or running anything (see :func:`unknown_name_error`)."""

    def _parse_ckpt_path(self) -> None:
        pass

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


#: ``data`` keys that only the several-domain data module has: a config that uses one runs MultiDomainDataModule
MULTI_DOMAIN_KEYS = ("sources", "targets", "domains", "test_domain", "validation_domain", "adapt_to_test_domain",
                     "val_split", "split_batch")


def data_module_class(args: Optional[list[str]]) -> type:
    """:class:`~tlframe.data.MultiDomainDataModule` when the run's ``data`` section (its config files, a ``--data``
    file, ``--data.*`` arguments) uses one of :data:`MULTI_DOMAIN_KEYS`, else the two-domain
    :class:`~tlframe.data.TransferDataModule`: single-pair configs stay as they are."""
    import yaml

    from tlframe.data import MultiDomainDataModule

    argv = list(sys.argv[1:] if args is None else args)
    sections: list[Any] = []
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in ("-c", "--config", "--data") and not value and i + 1 < len(argv):
            value = argv[i + 1]
        if key in ("-c", "--config", "--data") and value:
            try:
                with open(value) as f:
                    loaded = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                continue  # not a file (or not YAML): the parser reports it
            sections.append(loaded if key == "--data" else (loaded or {}).get("data") if isinstance(loaded, dict) else None)
        elif key.startswith("--data.") and key[len("--data."):].split(".")[0] in MULTI_DOMAIN_KEYS:
            return MultiDomainDataModule
    for section in sections:
        if isinstance(section, dict):
            section = section.get("init_args", section)
            if any(k in section for k in MULTI_DOMAIN_KEYS):
                return MultiDomainDataModule
    return TransferDataModule


def unknown_name_error(args: list[str]) -> Optional[str]:
    """The one-line error of ``tlframe <args>`` when they name a key, option or class that does not exist, else
    None. Values are not judged here (a bad value fails its own run). ``tlframe sweep`` calls it for every grid
    point before starting any run, so that a misspelled grid key stops the sweep at once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ParseOnly(TransferModule, data_module_class(args), seed_everything_default=0, args=args,
                       auto_configure_optimizers=False)
    except UnknownNameError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - any other problem is reported by the run itself
        return None
    return None


def _source_free_monitor(config: Any) -> None:
    """``data.source: null`` (source-free adaptation) logs no ``val/source_acc``: the default checkpoint monitor then
    becomes the label-free ``val/target_im`` (the information-maximisation loss of the target predictions, mean
    entropy minus the entropy of the mean: lower is better); an explicit other monitor is kept."""
    data, checkpoint = config.get("data"), config.get("checkpoint")
    if data is None or checkpoint is None or data.get("source", 0) is not None:
        return
    if checkpoint.get("monitor") == "val/source_acc":
        checkpoint["monitor"], checkpoint["mode"] = "val/target_im", "min"
        print("tlframe: data.source is null (source-free): best checkpoints are chosen by val/target_im "
              "(label-free; set checkpoint.monitor to change it)", file=sys.stderr)


def resolved_config(args: list[str]) -> dict:
    """The full config that ``tlframe <args>`` would run (every default filled in, as the run's ``config.yaml``),
    without building anything. Bad input raises :class:`~tlframe.checks.ConfigError` (one line)."""
    import yaml

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = _ParseOnly(TransferModule, data_module_class(args), seed_everything_default=0, args=args,
                         auto_configure_optimizers=False)
    command = cli.subcommand
    config = cli.config[command] if command else cli.config
    return yaml.safe_load(cli._parser(command).dump(config, skip_none=False))


def main(args: Optional[list[str]] = None) -> None:
    """Run the CLI. Bad input (data, backbone, weights, checkpoint, trainer settings) ends with its message
    and exit code 2, a non-finite loss with exit code 3: a message that names the problem and the fix, no traceback.

    ``tlframe sweep ...``, ``tlframe report ...``, ``tlframe rank ...`` and ``tlframe adapt ...`` go to
    :mod:`tlframe.sweep`, :mod:`tlframe.report`, :mod:`tlframe.rank` and :mod:`tlframe.adapt`.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("sweep", "report", "rank", "adapt"):
        if argv[0] == "sweep":
            from tlframe.sweep import main as command
        elif argv[0] == "rank":
            from tlframe.rank import main as command
        elif argv[0] == "adapt":
            from tlframe.adapt import main as command
        else:
            from tlframe.report import main as command
        raise SystemExit(command(argv[1:]))
    try:
        with warnings.catch_warnings():
            # Resuming mid-epoch is exact with tlframe's loaders (they skip the batches already trained);
            # an evaluated checkpoint's dirpath differs from the evaluation's on purpose.
            quiet_lightning()
            TLFrameCLI(TransferModule, data_module_class(args), seed_everything_default=0,
                       save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False)
    except BAD_INPUT_ERRORS as err:
        remove_unused_run_dirs()
        print(f"tlframe: error: {error_message(err)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except NonFiniteLossError as err:
        print(f"tlframe: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_NON_FINITE) from None
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Destroy the DDP process group before the interpreter exits.

    Lightning leaves it alive; at exit its backend threads were then torn down with the interpreter, and a rank
    could abort with ``terminate called without an active exception`` (SIGABRT) after a run that had finished
    and written everything, failing the launcher's exit code."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit; the run's results are already written
            pass


if __name__ == "__main__":
    main()
