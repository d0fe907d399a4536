"""One-line messages for config and command-line errors: the problem, where it was found and the fix.

jsonargparse reports a bad key or value as the whole usage text plus a nested "Does not validate
against any of the Union subtypes" block. :func:`explain` turns its message into
``<problem> (<where>): <fix>``, with the closest valid names ("did you mean trade_off?") for top-level
keys, for the arguments of nested ``class_path`` objects (strategies, domains, optimizers) and for
class names.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Optional, Sequence

import yaml

from tlframe.checks import ConfigError

__all__ = ["ConfigError", "UnknownNameError", "config_error", "explain", "parser_keys", "subcommand_parser"]


class UnknownNameError(ConfigError):
    """A key, option or class path that does not exist (as opposed to a value out of range or of a wrong type)."""


#: jsonargparse messages about a name that does not exist: unknown options and keys, classes that do not import.
_UNKNOWN_NAME = re.compile(r"is not accepted|unrecognized arguments|does not accept option|is not expected|"
                           r"No action for key|has no attribute|No module named|either not accessible|Import path")


def _closest(word: str, names: Sequence[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(names), n=n, cutoff=0.6)


def _did_you_mean(word: str, names: Sequence[str], fmt: str = "{}") -> str:
    close = _closest(word, names)
    return f"did you mean {' or '.join(fmt.format(c) for c in close)}?" if close else ""


def _config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _where(name: str, argv: Sequence[str]) -> str:
    """``on the command line`` or ``in FILE, line N`` for the option ``name`` (last key part), or ''."""
    last = name.rsplit(".", 1)[-1]
    if any(re.match(rf"--([\w.]+\.)?{re.escape(last)}(=|$)", a) for a in argv):
        return "on the command line"
    for file in reversed(_config_files(argv)):
        try:
            lines = Path(file).read_text().splitlines()
        except OSError:
            continue
        for lineno, line in enumerate(lines, start=1):
            if re.search(rf"(^|[\s{{,]){re.escape(last)}\s*:", line):
                return f"in {file}, line {lineno}"
    return ""


def _init_args(class_path: str) -> list[str]:
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]


def _siblings(class_path: str) -> dict[str, list[str]]:
    """``{class_path: init args}`` of the other public classes of the same module (e.g. every strategy)."""
    module_name = class_path.rpartition(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return {}
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    out = {}
    for name in names:
        obj = getattr(module, name, None)
        if inspect.isclass(obj):
            out[f"{module_name}.{name}"] = _init_args(f"{module_name}.{name}")
    return out


def _unknown_nested(key: str, class_path: str, option: str, argv: Sequence[str]) -> str:
    valid = _init_args(class_path)
    short = class_path.rsplit(".", 1)[-1]
    where = _where(option, argv)
    fix = _did_you_mean(option, valid)
    if not fix:  # an argument of another class of the same module (e.g. trade_off of DANN, not FineTune)?
        owners = {c.rsplit(".", 1)[-1]: _closest(option, args, 1) for c, args in _siblings(class_path).items()
                  if c != class_path}
        owners = {c: m[0] for c, m in owners.items() if m}
        if owners:
            name = next(iter(owners.values()))
            fix = (f"{name} is an argument of {', '.join(owners)}, not of {short}: choose one with "
                   f"--{key}={class_path.rpartition('.')[0]}.{next(iter(owners))}")
    fix = fix or f"{short} takes {', '.join(valid) if valid else 'no arguments'}"
    return f"{short} ({key}) has no argument {option!r}{f' ({where})' if where else ''}: {fix}"


#: Where tlframe's configurable classes live: the candidates of a "did you mean" for a class path.
CLASS_MODULES = ("tlframe.strategies", "tlframe.data", "torch.optim", "torch.optim.lr_scheduler")


def _classes_of(module: str) -> list[str]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    return [n for n in (getattr(mod, "__all__", None) or dir(mod))
            if not n.startswith("_") and inspect.isclass(getattr(mod, n, None))]


def _unknown_class(key: str, class_path: str) -> str:
    """``key`` names ``class_path``, which does not import: suggest the closest class paths tlframe knows."""
    module, _, name = class_path.rpartition(".")
    candidates = [f"{m}.{c}" for m in (module, *CLASS_MODULES) for c in _classes_of(m)] if module else []
    close = difflib.get_close_matches(class_path, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
    close += [c for c in dict.fromkeys(candidates) if c.rsplit(".", 1)[-1].lower() == name.lower() and c not in close]
    fix = f"did you mean {' or '.join(close[:3])}?" if close else (
        f"{module} has {', '.join(_classes_of(module))}" if _classes_of(module) else
        f"give a full class path from {', '.join(CLASS_MODULES)}, e.g. tlframe.strategies.DANN")
    return f"{key}: cannot import {class_path!r}: {fix}"


def _yaml_error(argv: Sequence[str], detail: str) -> str:
    for file in _config_files(argv):
        try:
            yaml.safe_load(Path(file).read_text())
        except OSError:
            continue
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"YAML syntax error in {file}{line}: {problem}: fix the YAML there (indentation, ':' or brackets)"
    return f"a config is not valid YAML ({' '.join(detail.split())}): fix its syntax"


def explain(message: str, argv: Sequence[str], valid_keys: Sequence[str] = (), command: str = "tlframe fit") -> str:
    """The one-line form of a jsonargparse error ``message`` raised while parsing ``argv``."""
    text = message.strip()
    help_hint = f"`{command} --help` lists every option"
    m = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", text)
    key = re.search(r'Parser key "([\w.]+)"', text)
    if m and key:
        return _unknown_nested(key.group(1), m.group(1), m.group(2), argv)
    m = re.search(r"Problem with given class_path '([\w.]+)':\s*(.+)", text)
    if m and key and re.search(r"has no attribute|No module named|not accessible|Import path", m.group(2)):
        return _unknown_class(key.group(1), m.group(1))
    if m and key:  # the class refused a value (checked while parsing)
        detail = m.group(2).strip().rstrip(". ")
        return f"{m.group(1).rsplit('.', 1)[-1]} ({key.group(1)}): {detail}: fix that value"
    m = re.search(r"Expected a path but ([\w.]+) either not accessible|module '[\w.]+' has no attribute|No module named", text)
    given = re.search(r"Given value: ([\w.]+)\s*$", text)
    path = (m.group(1) if m and m.lastindex else None) or (given.group(1) if given else None)
    if m and key and path:
        return _unknown_class(key.group(1), path)
    m = re.search(r"unrecognized arguments: (.*)", text)
    if m:
        parts = []
        for arg in m.group(1).split():
            name = arg.split("=", 1)[0].lstrip("-")
            fix = _did_you_mean(name, valid_keys, "--{}") if arg.startswith("--") else ""
            parts.append(f"unknown option {arg.split('=', 1)[0]} (on the command line): {fix or help_hint}")
        return "; ".join(parts)
    m = re.search(r"does not accept option '([\w.]+)'|Key \"([\w.]+)\" is not expected|No action for key \"([\w.]+)\"", text)
    if m:
        name = next(g for g in m.groups() if g)
        where = _where(name, argv)
        fix = _did_you_mean(name, valid_keys)
        return f"unknown key {name!r}{f' ({where})' if where else ''}: {fix or help_hint}"
    m = re.search(r'Parser key "config": File does not exist: (.*)', text)
    if m:
        path = m.group(1).strip().strip("'\"")
        return f"config file {path} does not exist (from {Path.cwd()}): check the path given to -c"
    if "Problems parsing config" in text:
        return _yaml_error(argv, text.split("Problems parsing config", 1)[1])
    m = re.search(r"Expected a (?:<class '(\w+)'>|(\S+))\. Got value: (.*)", text)
    if m and key:
        kind = m.group(1) or m.group(2)
        where = _where(key.group(1), argv)
        return f"{key.group(1)} must be a {kind}, got {m.group(3).strip()!r}{f' ({where})' if where else ''}: fix the value"
    expected = re.findall(r"Expected a <class '(\w+)'>", text)
    given = re.search(r"Given value: (.*)$", text)
    if key and expected and given:
        kinds = " or ".join(dict.fromkeys(k.replace("NoneType", "null") for k in expected))
        where = _where(key.group(1), argv)
        return f"{key.group(1)}: {given.group(1).strip()!r} is not a {kinds}{f' ({where})' if where else ''}: fix the value"
    lines = [ln.strip(" -") for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith(("Given value", "Subtypes", "Errors", "Does not validate"))]
    return " ".join(lines[:3])


def config_error(message: str, argv: Sequence[str], valid_keys: Sequence[str] = (),
                 command: str = "tlframe fit") -> ConfigError:
    """:func:`explain` as an exception: :class:`UnknownNameError` when ``message`` is about a name that does not
    exist (a misspelled key or class), else :class:`ConfigError`."""
    kind = UnknownNameError if _UNKNOWN_NAME.search(message) else ConfigError
    return kind(explain(message, argv, valid_keys, command))


def parser_keys(parser) -> list[str]:
    """Every option key (``data.batch_size``, ``model.strategy``, ...) of a jsonargparse parser."""
    keys = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", None)
        if dest and dest not in ("help", "config") and not dest.startswith("_"):
            keys.append(dest)
        for sub in (getattr(action, "_name_parser_map", None) or {}).values():
            keys.extend(parser_keys(sub))
    groups = {k.rsplit(".", 1)[0] for k in keys if "." in k}  # "model", "trainer": sections, not options
    return sorted(set(keys) - groups)


def subcommand_parser(parser, name: Optional[str]):
    """The parser of subcommand ``name`` (``fit``, ...) of a LightningCLI parser, else ``parser``."""
    for action in getattr(parser, "_actions", []):
        sub = (getattr(action, "_name_parser_map", None) or {}).get(name or "")
        if sub is not None:
            return sub
    return parser
