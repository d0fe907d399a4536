"""DomainBed's model selection on tlframe's logged validation records.

Gulrajani & Lopez-Paz (ICLR 2021, Sec. 3 and ``domainbed/model_selection.py``) pick, for each run, a checkpoint
(a validation step) and, for each trial, the hyper-parameters, with one of three methods:

- **training-domain validation** (:func:`training_domain_validation`, DomainBed's ``IIDAccuracySelectionMethod``):
  the step with the best mean accuracy over the training domains' validation splits;
- **leave-one-domain-out cross-validation** (:func:`leave_one_domain_out`, ``LeaveOneOutSelectionMethod``): runs
  that also hold out a second domain score each step by the mean accuracy on those validation domains;
- **test-domain validation, the oracle** (:func:`test_domain_oracle`, ``OracleSelectionMethod``): the last step,
  scored on the test domain's other split (it reads test-domain labels: an upper bound, not a method).

:func:`select_hparams` then picks, per trial, the hyper-parameters with the best validation accuracy and reports
the test accuracies over trials.

**Records.** One run's records are a list of dicts, one per validation (e.g. read from TensorBoard or a CSV
logger), each with ``step`` and the metrics that :class:`~tlframe.module.TransferModule` logs with a
:class:`~tlframe.data.MultiDomainDataModule`:

- ``val/source_acc``: the mean over the training domains of their validation accuracy;
- ``val/target_acc``: the held-out test domain's accuracy (DomainBed's ``in`` split with ``val_split: domain_test``);
- ``val/target_out_acc``: the held-out domain's other split (``out``; logged with ``val_split: domain_test``);
- ``val/validation_domain_acc``: the second held-out domain's accuracy (``validation_domain``).

Values may be floats or 0-d tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Union

__all__ = ["Selection", "HparamSelection", "training_domain_validation", "test_domain_oracle",
           "leave_one_domain_out", "select_hparams", "SELECTION_METHODS", "records_from_scalars", "run_selections"]

Record = Mapping[str, Any]

#: which logging produces each key (for the errors)
_KEY_SOURCES = {
    "step": "every record needs the global step of its validation",
    "val/source_acc": "TransferModule logs it at every validation (with a MultiDomainDataModule, the mean of the "
                      "training domains' accuracies)",
    "val/target_acc": "TransferModule logs it at every validation: the held-out test domain's accuracy",
    "val/target_out_acc": "logged with MultiDomainDataModule(val_split='domain_test'): the test domain's out split",
    "val/validation_domain_acc": "logged with MultiDomainDataModule(validation_domain=...): the second held-out "
                                 "domain of a leave-one-domain-out run",
}


@dataclass(frozen=True)
class Selection:
    """The checkpoint a method selects in one run: its ``step``, the ``val_acc`` it was selected by and its
    ``test_acc``; ``method`` names the method (DomainBed's names)."""

    step: int
    val_acc: float
    test_acc: float
    method: str


@dataclass(frozen=True)
class HparamSelection:
    """The result of :func:`select_hparams`: per trial the chosen hyper-parameters and their run's
    :class:`Selection`; the mean, the standard deviation (``ddof=0``, numpy's default as DomainBed) and the
    standard error ``std / sqrt(n)`` of the test accuracy over the ``n`` trials. DomainBed's tables print
    ``mean +/- stderr``."""

    method: str
    per_trial: dict = field(default_factory=dict)  # trial -> (hparams key, Selection)
    mean_test_acc: float = math.nan
    std_test_acc: float = math.nan
    stderr_test_acc: float = math.nan

    @property
    def num_trials(self) -> int:
        return len(self.per_trial)


def _value(record: Record, key: str, where: str) -> float:
    if key not in record or record[key] is None:
        have = sorted(k for k in record if isinstance(k, str))
        raise ValueError(f"{where}: a record (step {record.get('step', '?')}) has no {key!r} ({_KEY_SOURCES.get(key, '')}); "
                         f"its keys: {have}")
    value = record[key]
    return float(value.item() if hasattr(value, "item") else value)


def _sorted_by_step(records: Sequence[Record], where: str) -> list[Record]:
    if not records:
        raise ValueError(f"{where}: no records (a run logs one per validation)")
    for r in records:
        _value(r, "step", where)
    return sorted(records, key=lambda r: int(_value(r, "step", where)))  # stable: equal steps keep their order


def training_domain_validation(records: Sequence[Record], val_key: str = "val/source_acc",
                               test_key: str = "val/target_acc") -> Selection:
    """Training-domain validation (DomainBed's ``IIDAccuracySelectionMethod``): the record with the highest
    ``val_key`` (the mean validation accuracy over the training domains); ties go to the earliest step (DomainBed's
    ``argmax`` keeps the first maximum). ``test_acc`` is that record's ``test_key``."""
    name = "training-domain validation"
    rows = _sorted_by_step(records, name)
    scored = [(_value(r, val_key, name), r) for r in rows]
    best_val, best = max(scored, key=lambda t: t[0])  # max returns the first of equal maxima
    return Selection(int(_value(best, "step", name)), best_val, _value(best, test_key, name), name)


def test_domain_oracle(records: Sequence[Record], val_key: str = "val/target_out_acc",
                       test_key: str = "val/target_acc") -> Selection:
    """Test-domain validation, the oracle (DomainBed's ``OracleSelectionMethod``): the **last** record (no early
    stopping), with ``val_acc`` its ``val_key`` (the test domain's ``out`` split, used to compare hyper-parameters)
    and ``test_acc`` its ``test_key`` (the test domain's ``in`` split). Reads test-domain labels: report it as the
    oracle it is."""
    name = "test-domain validation (oracle)"
    last = _sorted_by_step(records, name)[-1]
    return Selection(int(_value(last, "step", name)), _value(last, val_key, name), _value(last, test_key, name), name)


test_domain_oracle.__test__ = False  # a selection method, not a test: pytest must not collect it where imported


def leave_one_domain_out(test_run_records: Sequence[Record], val_runs: Mapping[Hashable, Sequence[Record]],
                         val_key: str = "val/validation_domain_acc", test_key: str = "val/target_acc",
                         num_domains: Optional[int] = None) -> Selection:
    """Leave-one-domain-out cross-validation (DomainBed's ``LeaveOneOutSelectionMethod``).

    ``test_run_records``: the run that holds out only the test domain (its ``test_key`` is the test accuracy).
    ``val_runs``: for every other domain ``v``, the records of the run with the same hyper-parameters that holds
    out the test domain *and* ``v`` (``v`` its ``validation_domain``), whose ``val_key`` is ``v``'s accuracy.
    Step by step, ``val_acc`` is the mean of the validation domains' accuracies; steps where the test run or any
    validation run has no record are skipped (DomainBed's ``None``). The step with the best ``val_acc`` is
    selected (ties: the earliest). ``num_domains``: the data set's number of domains; when given, every domain but
    the test domain must have a validation run (DomainBed requires them all).
    """
    name = "leave-one-domain-out cross-validation"
    if not val_runs:
        raise ValueError(f"{name}: no validation runs (one per other domain, holding out the test domain and it)")
    if num_domains is not None and len(val_runs) != num_domains - 1:
        raise ValueError(f"{name}: {len(val_runs)} validation runs for {num_domains} domains: DomainBed needs one per "
                         f"domain other than the test domain ({num_domains - 1})")
    test_by_step: dict[int, Record] = {}
    for r in _sorted_by_step(test_run_records, f"{name} (test run)"):
        test_by_step.setdefault(int(_value(r, "step", name)), r)
    val_by_step: dict[Hashable, dict[int, float]] = {}
    for domain, records in val_runs.items():
        where = f"{name} (validation run of domain {domain!r})"
        val_by_step[domain] = {}
        for r in _sorted_by_step(records, where):
            val_by_step[domain].setdefault(int(_value(r, "step", where)), _value(r, val_key, where))
    best: Optional[tuple[float, int]] = None
    for step in sorted(test_by_step):
        accs = [by_step.get(step) for by_step in val_by_step.values()]
        if any(a is None for a in accs):
            continue
        val_acc = sum(accs) / len(accs)
        if best is None or val_acc > best[0]:
            best = (val_acc, step)
    if best is None:
        raise ValueError(f"{name}: no step has a record in the test run and in every validation run "
                         f"({sorted(map(str, val_runs))}): the runs must validate at the same steps")
    val_acc, step = best
    return Selection(step, val_acc, _value(test_by_step[step], test_key, name), name)


SELECTION_METHODS: dict[str, Callable[..., Selection]] = {
    "training_domain_validation": training_domain_validation,
    "test_domain_oracle": test_domain_oracle,
    "leave_one_domain_out": leave_one_domain_out,
}


def _ordered(keys: Sequence[Hashable]) -> list[Hashable]:
    try:
        return sorted(keys)
    except TypeError:
        return sorted(keys, key=str)


def select_hparams(runs_by_hparams: Mapping[Hashable, Mapping[Hashable, Any]],
                   method: Union[str, Callable[[Any], Selection]] = "training_domain_validation") -> HparamSelection:
    """DomainBed's hyper-parameter selection (``SelectionMethod.hparams_accs`` / ``sweep_acc`` and the grouping by
    trial of ``collect_results``).

    ``runs_by_hparams[h][trial]`` is the run of hyper-parameters ``h`` in trial ``trial`` (the trial seed: data
    split and initialisation): its records for ``"training_domain_validation"`` and ``"test_domain_oracle"``, a
    ``(test_run_records, val_runs)`` pair for ``"leave_one_domain_out"``; ``method`` may also be any function of a
    run returning a :class:`Selection`. For each trial, every hyper-parameter setting's run is scored by
    ``method`` and the one with the best ``val_acc`` is chosen (ties: the last setting in sorted order, as
    DomainBed's reversed stable sort); the result holds the chosen settings and the mean, std and standard error
    of their ``test_acc`` over the trials. A run the method cannot score (a missing key, no complete step) raises
    ``ValueError`` naming it, where DomainBed silently leaves the setting out.
    """
    if isinstance(method, str):
        if method not in SELECTION_METHODS:
            raise ValueError(f"select_hparams: unknown method {method!r}: use one of {sorted(SELECTION_METHODS)} or a "
                             "function of a run returning a Selection")
        fn = SELECTION_METHODS[method]
        select = (lambda run: fn(*run)) if method == "leave_one_domain_out" else fn
        label = method
    else:
        select, label = method, getattr(method, "__name__", "custom")
    if not runs_by_hparams:
        raise ValueError("select_hparams: no runs")
    trials = _ordered({t for runs in runs_by_hparams.values() for t in runs})
    per_trial: dict = {}
    for trial in trials:
        scored = [(h, select(runs_by_hparams[h][trial])) for h in _ordered(list(runs_by_hparams))
                  if trial in runs_by_hparams[h]]
        chosen = None
        for h, sel in scored:  # >=: the last of equal val_accs, as DomainBed's sorted(...)[::-1]
            if chosen is None or sel.val_acc >= chosen[1].val_acc:
                chosen = (h, sel)
        per_trial[trial] = chosen
    accs = [sel.test_acc for _, sel in per_trial.values()]
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    name = per_trial[trials[0]][1].method if per_trial else label
    return HparamSelection(name, per_trial, mean, std, std / math.sqrt(len(accs)))


def records_from_scalars(scalars: Mapping[str, Sequence[tuple[int, float]]],
                         keys: Sequence[str] = ("val/source_acc", "val/target_acc", "val/target_out_acc",
                                                "val/validation_domain_acc")) -> list[dict[str, Any]]:
    """One record per validation step from a run's scalar series (``{tag: [(step, value), ...]}``, e.g.
    :func:`tlframe.runs.read_scalars`): ``{"step": s, <tag>: value, ...}`` for the ``keys`` logged at that step,
    in step order (a tag logged twice at one step keeps its last value)."""
    by_step: dict[int, dict[str, Any]] = {}
    for key in keys:
        for step, value in scalars.get(key) or []:
            by_step.setdefault(int(step), {"step": int(step)})[key] = float(value)
    return [by_step[s] for s in sorted(by_step)]


def run_selections(scalars: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, dict[str, Any]]:
    """The checkpoint each applicable method selects in one run, as ``{method key: {"step", "val_acc", "test_acc",
    "method"}}``: ``training_domain_validation`` when ``val/source_acc`` and ``val/target_acc`` were logged at the
    same steps, ``test_domain_oracle`` when ``val/target_out_acc`` was too (DomainBed's protocol). Steps that miss
    a key are left out. Empty when nothing applies (e.g. a run without target labels)."""
    records = records_from_scalars(scalars)
    out: dict[str, dict[str, Any]] = {}
    both = [r for r in records if "val/source_acc" in r and "val/target_acc" in r]
    if both:
        out["training_domain_validation"] = _as_dict(training_domain_validation(both))
    oracle = [r for r in records if "val/target_out_acc" in r and "val/target_acc" in r]
    if oracle:
        out["test_domain_oracle"] = _as_dict(test_domain_oracle(oracle))
    return out


def _as_dict(selection: Selection) -> dict[str, Any]:
    return {"step": selection.step, "val_acc": selection.val_acc, "test_acc": selection.test_acc,
            "method": selection.method}
