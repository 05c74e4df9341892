"""The one evaluation loop every command runs on: load a suite's model, make its task,
evaluate a method, count FLOPs and time methods interleaved; and :func:`run_suite`,
every (model, task, method, r) cell of a suite, then throughput and FLOPs.

``turbo-eval run`` runs :func:`run_suite`; ``tune`` evaluates and times its candidates
with the same steps, ``bench`` profiles and times its sweep with them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .measure import count_flops, interleaved_throughput, peak_memory
from .methods import Cell, apply_method, cells_for
from .models import LoadedModel, load_model, weights_checksum
from .results import CorruptResultError, ResultStore, environment
from .suite import ModelSpec, Suite, TaskSpec, remote_code_problem
from .tasks import TASK_KINDS, Task

__all__ = [
    "evaluate_method",
    "load_suite_model",
    "make_task",
    "measure_speed",
    "method_call",
    "no_progress",
    "profile_methods",
    "run_suite",
    "time_methods",
]


def _progress(enabled: bool) -> Callable[[Any, str], Any]:
    def wrap(iterable: Any, description: str) -> Any:
        return tqdm(
            iterable, desc=description, leave=False, disable=not enabled, dynamic_ncols=True
        )

    return wrap


def no_progress(iterable: Any, description: str) -> Any:
    """The progress wrapper that shows nothing."""
    return iterable


Progress = Callable[[Any, str], Any]
#: one method's Turbo config overrides (None: the unpatched model)
Overrides = dict[str, Any] | None


# ------------------------------------------------------------ the shared steps
def load_suite_model(suite: Suite, spec: ModelSpec) -> LoadedModel:
    """A suite's model as the suite asks for it, created under the suite's seed."""
    return load_model(spec.name, spec.resolution, dict(spec.options), seed=suite.seed)


def make_task(
    suite: Suite, spec: ModelSpec, task_spec: TaskSpec, model: LoadedModel, quick: bool = False
) -> Task:
    """The task ``task_spec`` on ``model``, at the model's batch size (else the suite's)."""
    batch_size = spec.batch_size or suite.batch_size
    return TASK_KINDS[task_spec.kind](task_spec.options, model, suite.seed, batch_size, quick=quick)


def evaluate_method(
    model: LoadedModel,
    task: Task,
    overrides: Overrides,
    seed: int,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """``task``'s metrics with ``model`` patched for one method, under ``seed``."""
    apply_method(model, overrides)
    torch.manual_seed(seed)
    return dict(task.evaluate(progress))


def method_call(model: LoadedModel, inputs: Any, overrides: Overrides) -> Callable[[], object]:
    """One forward of ``inputs`` under a method (patched first, so calls may interleave)."""

    def run() -> object:
        apply_method(model, overrides)
        return model.forward_features(model.module, inputs, model.handle)

    return run


def profile_methods(
    model: LoadedModel,
    inputs: Any,
    configs: dict[str, Overrides],
    memory: bool = False,
    progress: Progress = no_progress,
) -> dict[str, dict[str, Any]]:
    """FLOPs of one call of every method (and its peak memory, when ``memory``) and the
    tokens the last block kept, per key of ``configs``.

    Each method is settled before it is counted: a cross-modal split is searched then,
    not inside the count.
    """
    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for key, overrides in progress(list(configs.items()), "FLOPs"):
            call = method_call(model, inputs, overrides)
            apply_method(model, overrides)
            row: dict[str, Any] = {"flops": count_flops(call)}
            if memory:
                row["peak_memory_bytes"] = peak_memory(call)
            state = model.handle.last_state if model.handle is not None else None
            counts = state.token_counts if state is not None else None
            # a pipeline's patch keeps no per-block counts: nothing to report then
            row["tokens_after_last_block"] = counts[-1] if counts else None
            rows[key] = row
    return rows


def time_methods(
    model: LoadedModel,
    inputs: Any,
    configs: dict[str, Overrides],
    items_per_call: int,
    repeats: int,
    baseline: str | None,
) -> dict[str, Any]:
    """Throughput of the methods of ``configs`` timed interleaved in this process
    (:func:`~turbo_eval.measure.interleaved_throughput`, one warm-up round)."""
    calls = {key: method_call(model, inputs, overrides) for key, overrides in configs.items()}
    with torch.inference_mode():
        return interleaved_throughput(
            calls, items_per_call=items_per_call, repeats=repeats, warmup=1, baseline=baseline
        )


def measure_speed(
    model: LoadedModel,
    cells: list[Cell],
    suite: Suite,
    items: list[Any],
    repeats: int,
    progress: Progress,
) -> dict[str, Any]:
    """FLOPs per item of every cell's method, and throughput timed per r.

    Methods at the same r cost the same FLOPs, so they are timed together: one
    interleaved group per r (with the baseline in each), so the ratios that rank
    them come from the same rounds of the same stretch of time.
    """
    inputs = model.prepare(items)
    configs = {cell.key: cell.overrides(suite) for cell in cells}
    profiled = profile_methods(model, inputs, configs, progress=progress)
    flops = {key: row["flops"] / len(items) for key, row in profiled.items()}
    baseline_key = next((c.key for c in cells if c.method == "baseline"), None)
    groups: dict[int, list[str]] = {}
    for cell in cells:
        if cell.method != "baseline":
            groups.setdefault(cell.r, []).append(cell.key)
    timing: dict[str, Any] = {"methods": {}, "groups": {}, "rounds": repeats}
    for r, keys in progress(sorted(groups.items()), "throughput per r"):
        members = ([baseline_key] if baseline_key else []) + keys
        group = time_methods(
            model, inputs, {key: configs[key] for key in members}, len(items), repeats, members[0]
        )
        timing["groups"][str(r)] = group
        for key in keys:
            timing["methods"][key] = group["methods"][key]
        if baseline_key and baseline_key not in timing["methods"]:
            timing["methods"][baseline_key] = group["methods"][baseline_key]
    timing["baseline"] = baseline_key
    model.set_method(None)
    return {
        "batch": len(items),
        "repeats": repeats,
        "measured_on_task": cells[0].task if cells else None,
        "flops_per_item": flops,
        "timing": timing,
        "torch_threads": torch.get_num_threads(),
    }


def _shared_speed(
    store: ResultStore, suite: Suite, model: str, task: str, modality: str
) -> dict[str, Any] | None:
    """Another image task's speed figures of the same model, re-keyed for ``task``.

    Images are resized to the model's resolution, so every image task feeds the same
    tensor shapes and the same methods cost the same: timing them once per model
    leaves the time for the quality cells. Text lengths differ per task: never shared.
    """
    if modality != "image":
        return None
    for other in suite.tasks:
        if other.model != model or other.name == task:
            continue
        speed = _read_speed(store, model, other.name, _silent)  # named at its own turn
        if speed is None:
            continue
        old, new = f"__{other.name}__", f"__{task}__"

        def rekey(mapping: dict[str, Any], old: str = old, new: str = new) -> dict[str, Any]:
            return {key.replace(old, new, 1): value for key, value in mapping.items()}

        timing = dict(speed["timing"])
        timing["methods"] = rekey(timing["methods"])
        timing["groups"] = {
            r: {
                **group,
                "methods": rekey(group["methods"]),
                "baseline": group["baseline"].replace(old, new, 1),
            }
            for r, group in timing.get("groups", {}).items()
        }
        if timing.get("baseline"):
            timing["baseline"] = timing["baseline"].replace(old, new, 1)
        return {
            **speed,
            "flops_per_item": rekey(speed["flops_per_item"]),
            "timing": timing,
            "measured_on_task": speed.get("measured_on_task", other.name),
        }
    return None


def _read_speed(
    store: ResultStore, model: str, task: str, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The speed figures, or None when missing or corrupt (a corrupt file is named and
    measured again)."""
    try:
        return store.read_speed(model, task)
    except CorruptResultError as error:
        log(f"{error}: recomputing")
        return None


def _cell_missing(store: ResultStore, key: str, log: Callable[[str], None]) -> bool:
    """Whether a cell must be computed: not there, or corrupt (named, recomputed)."""
    try:
        return store.read_cell(key) is None
    except CorruptResultError as error:
        log(f"{error}: recomputing")
        return True


def _suite_content(suite: dict[str, Any]) -> dict[str, Any]:
    """A suite's content: everything but where it was read from (``ok.toml`` and
    ``/abs/ok.toml`` are the same suite)."""
    return {key: value for key, value in suite.items() if key != "source"}


def _check_resume(store: ResultStore, suite: Suite, quick: bool) -> None:
    previous = store.read_run()
    if previous is None:
        return
    same_suite = _suite_content(previous["suite"]) == _suite_content(_jsonable(suite.to_dict()))
    if not (same_suite and previous.get("quick") == quick):
        raise RuntimeError(
            f"{store.root} holds results of a different suite or mode; resume needs the same "
            "suite: choose another --out, or pass --overwrite to start afresh"
        )


def _check_weights(store: ResultStore, model: LoadedModel, main: bool) -> None:
    """Record the model's weights' checksum in ``run.json``; refuse a resume whose model
    has other weights (its cells would be paired with cells of another network)."""
    checksum = weights_checksum(model.module)
    run = store.read_run() or {}
    recorded = run.get("weights", {}).get(model.name)
    if recorded is not None and recorded != checksum:
        raise RuntimeError(
            f"{store.root} holds cells of model {model.name!r} with other weights (checksum "
            f"{recorded}, now {checksum}): resume needs the same weights; choose another "
            "--out, or pass --overwrite to start afresh"
        )
    if recorded is None and checksum is not None and main:
        store.write_run({**run, "weights": {**run.get("weights", {}), model.name: checksum}})


def _jsonable(data: Any) -> Any:
    import json

    return json.loads(json.dumps(data, default=str))


def run_suite(
    suite: Suite,
    out: str | Path,
    quick: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    trust_remote_code: bool = False,
) -> ResultStore:
    """Run every missing cell of ``suite`` into ``out`` (finished cells are kept).

    Under ``torchrun`` every rank runs this; data is sharded by batch, results are
    gathered, and rank 0 alone writes files and measures throughput. Models are created
    under the suite's seed, and a resume whose weights differ is refused.

    Args:
        overwrite: first delete ``out`` if turbo-eval made it (its marker and layout).
        trust_remote_code: allow models with ``trust_remote_code = true`` in the suite.

    Raises:
        ValueError: the suite asks for remote code without ``trust_remote_code``.
        NotAResultsFolderError: ``overwrite`` on a folder turbo-eval did not make.
        CorruptResultError: ``run.json`` is unreadable (corrupt cells are recomputed).
    """
    problem = remote_code_problem(suite, trust_remote_code)
    if problem:
        raise ValueError(problem)
    distributed.init_from_env()
    main = distributed.is_main()
    progress = progress and main
    if not main:
        log = _silent
    store = ResultStore(out)
    if overwrite and store.root.exists() and main:
        log(store.clear())
    distributed.barrier()
    _check_resume(store, suite, quick)
    if store.read_run() is None and main:
        store.write_run(
            {
                "suite": _jsonable(suite.to_dict()),
                "quick": quick,
                "environment": environment(suite.seed),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
    bar = _progress(progress)
    for model_spec in suite.models:
        tasks = [t for t in suite.tasks if t.model == model_spec.name]
        todo = {
            t.name: [
                c
                for c in cells_for(suite, model_spec.name, t.name)
                if _cell_missing(store, c.key, log)
            ]
            for t in tasks
        }
        need_speed = [t for t in tasks if _read_speed(store, model_spec.name, t.name, log) is None]
        distributed.barrier()  # every rank has read the same to-do list
        if not any(todo.values()) and not need_speed:
            log(f"[{model_spec.name}] all cells done, skipping")
            continue
        log(f"[{model_spec.name}] loading")
        model = load_suite_model(suite, model_spec)
        _check_weights(store, model, main)
        for task_spec in tasks:
            task = make_task(suite, model_spec, task_spec, model, quick=quick)
            try:
                facts = task.prepare(bar)
            except FileNotFoundError as missing:  # a dataset that is not installed here
                log(f"[{model_spec.name}/{task.name}] SKIPPED: {missing}")
                continue
            log(f"[{model_spec.name}/{task.name}] {facts}")
            for cell in bar(todo[task.name], f"{task.name} cells"):
                started = time.perf_counter()
                metrics = evaluate_method(model, task, cell.overrides(suite), suite.seed, bar)
                items = metrics.pop("items", None)
                state = model.handle.last_state if model.handle else None
                if not main:
                    continue
                store.write_cell(
                    cell.key,
                    {
                        **dataclasses.asdict(cell),
                        "label": cell.label,
                        "metric": task.metric,
                        "metrics": metrics,
                        "item_score": task.item_score or None,
                        "items": items,
                        "data": facts,
                        "seconds": time.perf_counter() - started,
                        "token_counts": list(state.token_counts) if state else None,
                        "cross_split": getattr(model, "cross_split", None),
                    },
                )
                log(f"  {cell.label:<32} {task.metric}={metrics[task.metric]:.4f}")
            if main and _read_speed(store, model_spec.name, task.name, _silent) is None:
                cells = cells_for(suite, model_spec.name, task.name)
                shared = _shared_speed(store, suite, model_spec.name, task.name, model.modality)
                if shared is None:
                    items = list(task.speed_items())[: suite.throughput_batch]
                    shared = measure_speed(
                        model, cells, suite, items, suite.throughput_repeats, bar
                    )
                store.write_speed(model_spec.name, task.name, shared)
            distributed.barrier()
        model.set_method(None)
    return store


def _silent(message: str) -> None:
    """Logger of the non-main ranks."""
