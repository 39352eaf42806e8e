"""Run configurations as trees: sections owned by their components, read from TOML, overridden by key.

A training run is configured by five sections, each a validated dataclass of the component that
owns it (see :class:`leastcontrol.train.TrainConfig`)::

    [model]   name, hidden, ...            leastcontrol.systems.ModelConfig
    [method]  name, alpha, ...             the method's own dataclass (leastcontrol.methods)
    [method.solver] / [method.controlled]  its solvers (leastcontrol.solvers), with [...mix]
    [data]    name, dir, limit_train, ...  leastcontrol.data.DataConfig
    [loop]    epochs, batch_size, lr, ...  leastcontrol.train.LoopConfig
    [output]  json_out, checkpoint, ...    leastcontrol.train.OutputConfig

This module holds what every section shares: building a dataclass from a table with messages that
name the key and the valid ones, the ``--set section.key=value`` overrides, TOML output, and the
migration of the flat files of earlier versions (one table of ``key = value``) to the tree.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from .errors import ConfigError

Tree = Dict[str, Any]


# --- values ------------------------------------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_number(where: str, value, *, low: float = 0.0, strict: bool = True, integer: bool = False,
                 none_ok: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number above ``low`` (or ``None`` where allowed)."""
    if value is None and none_ok:
        return
    kind = (int,) if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > low if strict else value >= low)):
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"{where} must be {what} {'>' if strict else '>='} {low:g}, got {value!r}")


def check_choice(where: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {where} '{value}'; valid: {', '.join(sorted(choices))}")


def check_table(cls, values: Mapping[str, Any], where: str, *, of: str = "", extra: Tuple[str, ...] = ()) -> None:
    """Check a table's keys against the fields of the dataclass ``cls`` and their types.

    Raises:
        ConfigError: ``where: unknown key 'k'{of}; valid keys: ...`` (``extra`` listed first), or
            ``where.k must be <type>, got <value>``.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}'{of}; valid keys: {', '.join(list(extra) + names)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{where}.{key} must be {_type_name(hints[key])}, got {value!r}")


def section(cls, values: Mapping[str, Any] | None, where: str):
    """The dataclass ``cls`` from a table, each key checked against the fields and their types (:func:`check_table`)."""
    values = dict(values or {})
    check_table(cls, values, where)
    return cls(**values)


def plain(value: Any) -> Any:
    """A config object as plain data (dicts, lists, scalars), for JSON, TOML and comparisons."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# --- trees -------------------------------------------------------------------------------------
def merge(base: Tree, over: Mapping[str, Any]) -> Tree:
    """``base`` with ``over`` laid on top, table by table (a table replaces a scalar and vice versa)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def paths(tree: Mapping[str, Any], prefix: str = "") -> List[str]:
    """The dotted paths of the leaves of ``tree``."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out += paths(value, path + ".") if isinstance(value, Mapping) else [path]
    return out


def get_path(tree: Mapping[str, Any], path: str, default=None):
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


class _Absent:
    """The value :func:`diff_trees` reports for a key that one of the trees lacks."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def diff_trees(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Sequence[str] = ()) -> List[Tuple[str, Any, Any]]:
    """The leaves where two trees differ, as ``(dotted key, value in a, value in b)``, depth first: each
    table's keys in ``a``'s order, then those only ``b`` has.

    Nested tables (mappings) are compared key by key; any other value (scalars, lists) as a whole,
    with ``==``. A key present in one tree only differs; the other side's value is :data:`ABSENT`.
    Where one tree holds a table and the other a value, the key is reported once with both.
    ``ignore`` holds dotted prefixes: ``"output"`` skips ``output`` and everything under it,
    ``"data.dir"`` that key alone (and ``data.dir.*``, were it a table), not ``data.dirs``.
    """
    ignore = tuple(ignore)
    out: List[Tuple[str, Any, Any]] = []

    def skipped(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in ignore)

    def walk(x: Mapping[str, Any], y: Mapping[str, Any], prefix: str) -> None:
        for name in list(x) + [k for k in y if k not in x]:
            key = f"{prefix}{name}"
            if skipped(key):
                continue
            u, v = x.get(name, ABSENT), y.get(name, ABSENT)
            if isinstance(u, Mapping) and isinstance(v, Mapping):
                walk(u, v, key + ".")
            elif u is ABSENT or v is ABSENT or u != v:
                out.append((key, u, v))

    walk(a, b, "")
    return out


def set_path(tree: Tree, path: str, value: Any) -> Tree:
    """A copy of ``tree`` with the leaf at the dotted ``path`` set (tables created on the way)."""
    head, _, rest = path.partition(".")
    out = dict(tree)
    if rest:
        child = out.get(head)
        out[head] = set_path(dict(child) if isinstance(child, Mapping) else {}, rest, value)
    else:
        out[head] = value
    return out


def parse_value(text: str) -> Any:
    """A ``--set`` value as TOML reads it (``1e-4``, ``true``, ``"adam"``, ``[1, 2]``), else the bare string."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except ValueError:
        return text


def parse_override(item: str) -> Tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)``.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set takes section.key=value (e.g. method.alpha=1 or method.solver.tol=1e-4), got {item!r}")
    return key, parse_value(text.strip())


def read_file(path: str | Path) -> Tree:
    """A TOML (``.toml``) or JSON file's table.

    Raises:
        ConfigError: missing, unreadable or unparsable file, or not a table; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text ({exc})") from None
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return values


def to_toml(tree: Mapping[str, Any]) -> str:
    """``tree`` as TOML: scalars first, then one ``[table]`` per nested table; unset (None) values are
    written as comments, since TOML has no null."""
    lines: List[str] = []

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    def key(k: str) -> str:   # a bare key, or a quoted one (parameter patterns: "W.1", "b.*")
        return k if k and all(c.isalnum() or c in "_-" for c in k) and k.isascii() else json.dumps(k)

    def emit(table: Mapping[str, Any], name: str):
        scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        if "name" in scalars:   # a table's name first: it says what the other keys belong to
            scalars = {"name": scalars.pop("name"), **scalars}
        if name and (scalars or not table):
            lines.append(f"\n[{name}]")
        for k, v in scalars.items():
            lines.append(f"# {key(k)} = (unset)" if v is None else f"{key(k)} = {value(v)}")
        for k, v in table.items():
            if isinstance(v, Mapping):
                emit(v, f"{name}.{key(k)}" if name else key(k))

    emit(tree, "")
    return "\n".join(lines).lstrip("\n") + "\n"


# --- the flat files of earlier versions ---------------------------------------------------------
# Where each key of a flat file (one table of `key = value`, as written before the sections) lives now.
_FLAT = {
    "model": "model.name", "hidden": "model.hidden", "recurrent_bias": "model.recurrent_bias",
    "method": "method.name", "impl": "method.impl",
    "alpha": "method.alpha", "k_i": "method.k_i", "k_p": "method.k_p", "kappa": "method.kappa",
    "controlled_residual": "method.controlled_residual", "ff_init": "method.ff_init",
    "sigma": "method.sigma", "tau_noise": "method.tau_noise", "noise_steps": "method.noise_steps",
    "tau_q": "method.tau_q", "wd_q": "method.wd_q", "timescale": "method.timescale",
    "dt": "method.solver.dt", "tol": "method.solver.tol", "max_iter": "method.solver.max_steps",
    "solver": "method.solver.name", "check_every": "method.solver.check_every",
    "patience": "method.solver.patience", "stall_tol": "method.solver.stall_tol",
    "check_stability": "method.solver.check_stability",
    "anderson_memory": "method.solver.mix.memory", "anderson_after": "method.solver.mix.after",
    "anderson_restarts": "method.solver.mix.restarts",
    "dataset": "data.name", "data_dir": "data.dir", "limit_train": "data.limit_train",
    "limit_test": "data.limit_test", "augment": "data.augment",
    "epochs": "loop.epochs", "batch_size": "loop.batch_size", "lr": "loop.lr", "weight_decay": "loop.weight_decay",
    "optimizer": "loop.optimizer", "schedule": "loop.schedule", "grad_clip": "loop.grad_clip", "seed": "loop.seed",
    "eval_every": "loop.eval_every", "eval_batch_size": "loop.eval_batch_size", "device": "loop.device",
    "amp": "loop.amp", "skip_diverged": "loop.skip_diverged",
    "json_out": "output.json_out", "checkpoint": "output.checkpoint", "resume": "output.resume",
    "progress": "output.progress",
}
SECTIONS = ("model", "method", "data", "loop", "output", "preset")


_FLAT_ONLY = {"compile", "native", "warm_start_tol", "ebd_optim", "ebd_lr", "ebd_steps"}


def is_flat(values: Mapping[str, Any]) -> bool:
    """Whether ``values`` is a flat table of an earlier version: a key of that version's vocabulary
    holding a value, not a table (``model = "rnn"``, ``tol = 1e-6``)."""
    return any((k in _FLAT or k in _FLAT_ONLY) and not isinstance(v, Mapping) for k, v in values.items())


def migrate_flat(values: Mapping[str, Any], where: str = "config") -> Tree:
    """A flat table of an earlier version as the tree of sections.

    The solver settings go to ``method.solver``; ``compile``/``native`` become its ``backend``;
    ``warm_start_tol`` gives ``method.free`` (the solver with that tol); ``ebd_optim``/``ebd_lr``/
    ``ebd_steps`` give LCP-EBD's ``method.controlled``; for ``bptt``, ``max_iter`` is the unrolled steps.

    Raises:
        ConfigError: a key that no version knew, naming the valid keys.
    """
    tree: Tree = {}
    extra = _FLAT_ONLY
    for key, value in values.items():
        if isinstance(value, Mapping):
            raise ConfigError(f"{where}: the table [{key}] beside flat keys of an earlier version; write every "
                              "setting in its section ([model], [method], [data], [loop], [output])")
        if key in _FLAT:
            if value is not None:
                tree = set_path(tree, _FLAT[key], value)
        elif key not in extra:
            raise ConfigError(f"{where}: unknown key '{key}'; valid keys: {', '.join(sorted(set(_FLAT) | extra))}")
    backend = (["native"] if values.get("native") else []) + (["compile"] if values.get("compile") else [])
    if backend:
        tree = set_path(tree, "method.solver.backend", backend)
    if get_path(tree, "method.name") == "bptt" and get_path(tree, "method.solver.max_steps") is not None:
        tree = set_path(tree, "method.steps", get_path(tree, "method.solver.max_steps"))
    if values.get("warm_start_tol") is not None:
        tree = set_path(tree, "method.free", {**get_path(tree, "method.solver", {}), "tol": values["warm_start_tol"]})
    if any(values.get(k) is not None for k in ("ebd_optim", "ebd_lr", "ebd_steps")):
        adam = values.get("ebd_optim", "adam") == "adam"
        rule = {"name": "adam" if adam else "euler", "tol": 0.0, "max_steps": values.get("ebd_steps", 800),
                ("lr" if adam else "dt"): values.get("ebd_lr", 0.01)}
        tree = set_path(tree, "method.controlled", rule)
    return tree


def as_tree(values: Mapping[str, Any], where: str = "config") -> Tree:
    """``values`` as a tree of sections, migrating a flat table of an earlier version."""
    return migrate_flat(values, where) if is_flat(values) else dict(values)
