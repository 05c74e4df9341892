"""Every VLM token-reduction method on one model shape: prefill FLOPs, TTFT, peak memory,
the method's own cost and fidelity to the unpatched model, at 64 / 128 / 192 tokens kept.

Shapes (random weights, built by ``benchmarks/llava_ttft.py`` / ``connector_ttft.py``):
``--model llava``: LLaVA-1.5-7B's (CLIP ViT-L/14 at 336 px at full size, 576 image tokens,
LLaMA-7B width, ``--llm-layers`` deep); ``--model qwen2_5_vl``: Qwen2.5-VL-7B's (its tower
at full size, a ``--size`` px image: 896 px gives 1024 image tokens; width 3584). ``--tiny``
shrinks both to a few seconds (the smoke test's path; the figures then mean nothing).

Methods (rows), all on one patched model, selected per call:
  unpatched                     ``turbo_mode="none"``
  turbo/visionzip/divprune/cdpruner  the connector stage (``ConnectorReduction``)
  turbo-tower                   Turbo in the vision tower: LLaVA ``Target(tokens=K + 1)``;
                                Qwen2.5-VL ``QwenTowerReduction(budget=K)``, whole 2x2
                                units merged within windows after blocks 0..3 (fewer on
                                the tiny tower)
A method the family refuses (VisionZip without a guide; Qwen's tower at a budget below
an image's window count) is a row marked refused with the library's error.
  fastv, pyramiddrop, sparsevlm LLM mode (``LLMReduction``)

LLM mode on a shallow model: its full-depth schedule (in LLaVA-1.5-7B / Qwen2.5-VL-7B
layers) is compressed to one shallow layer per stage, and every shallow layer stands for a
number of full-depth layers (``weights``; the projection multiplies each layer's measured
time by it). FastV: K=2, K image tokens kept. PyramidDrop: K kept at layer 2, K/2 at
D/3+2 and K/4 at 2D/3+2 (its halving ratio, started at FastV's layer so the budget is the
count after the first drop). SparseVLM: its published LLaVA-1.5 count lists for 64 / 128 /
192 (``LLMReduction.sparse_vlm``) at layers 3 / 7 / 16 (Qwen: scaled to 3 / 6 / 14), with
30 % recycling; on Qwen the counts are scaled by N/576. The shallow variants rank at
shallow layers, so their fidelity is that of the shallow variant.

Measured per method and budget: prefill GFLOPs (``turbo_eval.measure.count_flops``, fused
CPU attention counted by its registered formula), prefill peak MiB (torch's CPU allocator,
from the profiler's memory events: ``llava_ttft.prefill_peak_bytes``; activations, KV cache
and logits, not the weights; both split by default: the vision tower counted once, in
the unpatched call, plus each row's call with the tower's output replayed and its peak
bytes reserved in its place, exactly the whole call's figures (``TowerSplit``; the tests
check it; ``--static-whole`` counts each whole call), TTFT (``generate`` with one new
token; methods interleaved in each round, the order rotated per round; speedup = median of per-round ratios to the
unpatched run of the same round, [min, max] over rounds), the method's own time (connector
method calls; LLM-mode ``reduce_at_layer`` calls, ranking attention included; tower merging
is inside the tower's layers and not separated: "-"), first-token KL(unpatched || method)
and first-token agreement over ``--prompts`` prompts, and answer agreement (all
``--new-tokens`` greedy tokens equal to unpatched's). Projection to full depth (LLaVA-1.5-7B:
32 layers, Qwen2.5-VL-7B: 28): TTFT - measured layer time + sum(weight * layer time), per
round; the method's share is its time over that projected reduced TTFT. Projections are
labelled as such. "tower s": seconds inside the vision tower (hooks on it). Below the
table, Amdahl's bound with the tower unreduced (``bounds``): the largest projected TTFT
ratio a connector or LLM method can reach, with its LLM free and at each budget.

Long runs: ``--methods`` picks rows (unpatched always runs; rows run budget after budget);
``--prompts 0`` takes the fidelity from the first timed round's first token (no separate
fidelity pass); the json is rewritten after every call, so a stopped run leaves what it measured (``--render
out.json [--static-json static.json]`` prints its table).

Usage: python benchmarks/vlm_methods.py [--model llava|qwen2_5_vl --rounds 3 --batch 1
    --budgets 64 128 --methods turbo fastv --prompts 0 --json out.json] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import turbo_adapters as ta
from turbo_adapters.connector import ConnectorReduction
from turbo_adapters.families.llava import llm as llm_mode
from turbo_adapters.families.llava.llm import LLMReduction
from turbo_adapters.families.qwen_vl import QwenTowerReduction
from turbo_core.connector import CONNECTOR_METHODS
from turbo_core.schedule import Target
from turbo_eval.measure import count_flops

sys.path.insert(0, str(Path(__file__).parent))
import connector_ttft
import llava_ttft

FULL_DEPTH = {"llava": 32, "qwen2_5_vl": 28}
#: image tokens kept; Qwen2.5-VL's 1024: the same 64 and 128 (6.25 %, 12.5 %) and 25 %
BUDGETS = {"llava": (64, 128, 192), "qwen2_5_vl": (64, 128, 256)}
CONNECTOR = ("turbo", "visionzip", "divprune", "cdpruner")
LLM = ("fastv", "pyramiddrop", "sparsevlm")
METHODS = ("unpatched", *CONNECTOR, "turbo-tower", *LLM)
#: SparseVLM's LLaVA-1.5 count lists per budget (of 576 image tokens)
SPARSEVLM_COUNTS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
SHALLOW_LAYERS = 4  # layer 0 full, then one layer per LLM-mode stage


class MethodTimer:
    """Seconds spent in connector methods and LLM-mode reductions (wrapped in place)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._undo: list[Callable[[], None]] = []
        for name in CONNECTOR:
            original = CONNECTOR_METHODS[name]
            CONNECTOR_METHODS[name] = self._timed(original)
            self._undo.append(lambda n=name, o=original: CONNECTOR_METHODS.__setitem__(n, o))
        original_reduce = llm_mode.reduce_at_layer
        llm_mode.reduce_at_layer = self._timed(original_reduce)
        self._undo.append(lambda: setattr(llm_mode, "reduce_at_layer", original_reduce))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        return timed

    def close(self) -> None:
        for undo in self._undo:
            undo()


class Clock:
    """Seconds inside each decoder layer, less the LLM-mode reduction run inside it (timed
    once by ``timer``, not multiplied by the projection), each layer's input length, and
    the seconds inside the vision tower (the part no connector or LLM method shortens)."""

    def __init__(self, layers: Any, timer: MethodTimer, tower: Any) -> None:
        self.timer = timer
        self.times = [0.0] * len(layers)
        self.lengths = [0] * len(layers)
        self.tower = 0.0
        self._start = 0.0
        self._method = 0.0
        self._tower_start = 0.0
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._enter(i), with_kwargs=True)
            layer.register_forward_hook(self._leave(i))
        tower.register_forward_pre_hook(self._tower_enter)
        tower.register_forward_hook(self._tower_leave)

    def reset(self) -> None:
        self.times = [0.0] * len(self.times)
        self.lengths = [0] * len(self.lengths)
        self.tower = 0.0

    def _tower_enter(self, *_: Any) -> None:
        self._tower_start = time.perf_counter()

    def _tower_leave(self, *_: Any) -> None:
        self.tower += time.perf_counter() - self._tower_start

    def _enter(self, i: int) -> Callable[..., None]:
        def hook(_: Any, args: Any, kwargs: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if not self.lengths[i]:  # the prefill: the first call of the generate
                self.lengths[i] = hidden.shape[1]
            self._method = self.timer.seconds
            self._start = time.perf_counter()

        return hook

    def _leave(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            inside = self.timer.seconds - self._method
            self.times[i] += time.perf_counter() - self._start - inside

        return hook


class TowerInside(RuntimeError):
    """The method works inside the vision tower this call (hooks on its layers): the tower's
    output cannot be replayed for it."""


def _hooks(module: Any) -> set[int]:
    """The ids of the forward (pre-)hooks on the modules inside ``module`` (not on it)."""
    found: set[int] = set()
    for sub in list(module.modules())[1:]:
        found.update(id(h) for h in sub._forward_pre_hooks.values())
        found.update(id(h) for h in sub._forward_hooks.values())
    return found


def _clone(value: Any) -> Any:
    """A fresh copy of a tower output: every tensor cloned (the same bytes allocated)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):  # transformers' ModelOutput is a dict
        return type(value)(**{k: _clone(v) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


@contextlib.contextmanager
def _forward(module: Any, forward: Callable[..., Any]) -> Iterator[None]:
    """``module.forward`` is ``forward`` while inside (its hooks still run around it)."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


class TowerSplit:
    """The static pass in two parts, exact: the vision tower counted once, and each row's
    call after it.

    ``capture`` runs one call (unpatched) with the tower's own forward counted alone: its
    FLOPs and its peak bytes above the bytes live at its entry (``prefill_peak_bytes`` of
    the tower's forward), and keeps a copy of its output and inputs. ``replay`` then stands
    in for the tower in a row's call: it allocates and frees the tower's peak bytes (so the
    live-bytes curve reaches the height the tower reached, from the row's own live bytes at
    the tower's entry) and returns fresh clones of the output (the bytes the tower leaves
    live), with no FLOPs. So a row's count under ``replay`` plus ``flops`` is its whole
    call's FLOPs, and its peak under ``replay`` is its whole call's peak, as long as the
    tower computes the same thing in the row's call: the same inputs (checked: else
    RuntimeError) and nothing of the method inside it (forward hooks on the tower's layers
    that the captured call did not have: ``TowerInside``, the row is counted whole).
    ``tests/adapters/test_vlm_methods_bench.py`` checks split == whole on tiny configs."""

    def __init__(self, tower: Any) -> None:
        self.tower = tower
        self.flops = 0
        self.peak = 0
        self._inputs: list[torch.Tensor] = []
        self._output: Any = None
        self._hooks: set[int] = set()

    @staticmethod
    def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]

    def capture(self, call: Callable[[], Any]) -> None:
        original = self.tower.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            box: list[Any] = []
            flops: list[int] = []

            def run() -> None:
                flops.append(count_flops(lambda: box.append(original(*args, **kwargs))))

            self.peak = llava_ttft.prefill_peak_bytes(run)
            self.flops = flops[0]
            self._inputs = [t.clone() for t in self._tensors(args, kwargs)]
            self._output = _clone(box[0])
            self._hooks = _hooks(self.tower)
            return box[0]

        with _forward(self.tower, forward):
            call()
        if self._output is None:
            raise RuntimeError("the captured call did not run the vision tower")

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if self._output is None:
            raise RuntimeError("TowerSplit.replay needs a capture() first")

        def forward(*args: Any, **kwargs: Any) -> Any:
            if _hooks(self.tower) - self._hooks:
                raise TowerInside("the method hooks the vision tower's layers in this call")
            given = self._tensors(args, kwargs)
            if len(given) != len(self._inputs) or not all(
                a.shape == b.shape and torch.equal(a, b)
                for a, b in zip(given, self._inputs, strict=True)
            ):
                raise RuntimeError("the replayed vision tower got other inputs than captured")
            torch.empty(self.peak, dtype=torch.uint8)  # the tower's peak, freed at once
            return _clone(self._output)

        with _forward(self.tower, forward):
            yield


def llm_setting(method: str, budget: int, n_image: int, depth: int) -> tuple[LLMReduction, list]:
    """The shallow LLM-mode setting and the full-depth layers each shallow layer stands for."""
    if method == "fastv":
        rest = (depth - 2) / (SHALLOW_LAYERS - 1)
        return LLMReduction(layer=1, keep=budget / n_image), [2, *[rest] * (SHALLOW_LAYERS - 1)]
    if method == "pyramiddrop":
        keep = budget / n_image
        setting = LLMReduction(layer=1, keep=keep, stages=((2, keep / 2), (3, keep / 4)))
        third = (depth - 2) / 3
        return setting, [2, third, third, third]
    nearest = min(SPARSEVLM_COUNTS, key=lambda b: abs(b - budget * 576 / n_image))
    scale = budget / nearest  # its list for the nearest budget, scaled to this one
    counts = [max(1, min(n_image, round(c * scale))) for c in SPARSEVLM_COUNTS[nearest]]
    full_layers = (3, 7, 16) if depth == 32 else (3, 6, 14)
    setting = LLMReduction.sparse_vlm(counts=counts, layers=(1, 2, 3), image_tokens=n_image)
    a, b, c = full_layers
    return setting, [a, b - a, c - b, depth - c]


class Subject:
    """A patched model of one shape with its inputs and how to run each method."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.name = args.model
        self.tower_layers = tuple(getattr(args, "tower_layers", (0, 1, 2, 3)))
        self.depth = FULL_DEPTH[args.model]
        shape = "tiny" if args.tiny else "medium"
        prompts = max(1, args.prompts)  # --prompts 0: the timing prompt only
        if args.model == "llava":
            self.model = llava_ttft.build(SHALLOW_LAYERS, shape)
            self.feeds = [llava_ttft.inputs(args.batch, shape, seed=1 + p) for p in range(prompts)]
            self.n_image = (llava_ttft.SHAPES[shape][0] // 14) ** 2
        else:
            self.model = build_qwen_shape(args.tiny)
            size = 112 if args.tiny else args.size
            self.feeds = [
                connector_ttft.qwen_inputs(args.batch, size, seed=1 + p) for p in range(prompts)
            ]
            self.n_image = (size // 14) ** 2 // 4
        self.patch = ta.apply(self.model)
        self.layers = self.model.model.language_model.layers
        self.timer = MethodTimer()
        inner = self.model.model
        self.tower = inner.vision_tower if args.model == "llava" else inner.visual
        self.clock = Clock(self.layers, self.timer, self.tower)
        self.budgets = list(args.budgets or BUDGETS[args.model])
        if args.tiny:  # the same shares of the tiny image
            self.budgets = [max(1, b * self.n_image // (576 if args.model == "llava" else 1024))
                            for b in self.budgets]  # fmt: skip

    def configure(self, method: str, budget: int) -> tuple[dict[str, Any], list[float]]:
        """Set the patch for ``method`` at ``budget``; the generate kwargs and layer weights."""
        uniform = [self.depth / SHALLOW_LAYERS] * SHALLOW_LAYERS
        if method == "unpatched":
            return {"turbo_mode": "none"}, uniform
        if method in CONNECTOR:
            self.patch.connector = ConnectorReduction(budget=budget, method=method)
            return {"turbo_mode": "connector"}, uniform
        if method == "turbo-tower":
            if self.name == "llava":
                self.patch.r = Target(tokens=budget + 1)  # the CLS token is in the count
            else:  # Qwen: K units kept per image, merged after --tower-layers (0..3)
                depth = len(self.model.model.visual.blocks)
                layers = tuple(v for v in self.tower_layers if v < depth) or (0,)
                self.patch.tower = QwenTowerReduction(budget=budget, layers=layers)
            return {"turbo_mode": "tower"}, uniform
        setting, weights = llm_setting(method, budget, self.n_image, self.depth)
        self.patch.llm = setting
        return {"turbo_mode": "llm"}, weights

    def generate(self, feed: dict[str, Any], kwargs: dict[str, Any], new: int) -> Any:
        return self.model.generate(
            **feed, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            output_logits=True, return_dict_in_generate=True, **kwargs,
        )  # fmt: skip


def build_qwen_shape(tiny: bool) -> Any:
    if not tiny:
        return connector_ttft.build_qwen(SHALLOW_LAYERS)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 64, "patch_size": 14, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        text_config={"hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": SHALLOW_LAYERS, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 32064, "pad_token_id": 0,
                     "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [2, 3, 3]}},
        image_token_id=32000, video_token_id=32001, vision_start_token_id=32002,
        vision_end_token_id=32003, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    llava_ttft._informative_llm(model.model.language_model)
    model.generation_config.pad_token_id = 0
    return model


def fidelity(row: dict[str, Any], ref: Any, out: Any, new: int) -> None:
    """First-token KL(unpatched || method) and agreements of one call against unpatched's."""
    ref_log = ref.logits[0].float().log_softmax(-1)
    first = out.logits[0].float().log_softmax(-1)
    row["kl"].append((ref_log.exp() * (ref_log - first)).sum(-1).mean().item())
    row["first_agree"].append((first.argmax(-1) == ref_log.argmax(-1)).float().mean().item())
    same = out.sequences[:, -new:] == ref.sequences[:, -new:]
    row["answer_agree"].append(same.all(-1).float().mean().item())


REFUSALS = (ValueError, RuntimeError, NotImplementedError)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    subject = Subject(args)
    # --methods: the rows in the order given, budget after budget (a stopped run has
    # measured every method at the first budgets)
    methods = args.methods or METHODS[1:]
    runs = [("unpatched", 0), *((m, b) for b in subject.budgets for m in methods)]
    rows: dict[str, dict[str, Any]] = {}
    for method, budget in runs:
        key = f"{method}@{budget}" if budget else method
        rows[key] = {"method": method, "budget": budget, "ttft": [], "projected": [],
                     "method_s": [], "tower_s": [], "kl": [], "first_agree": [],
                     "answer_agree": []}  # fmt: skip
    active = list(rows)
    result = {"args": vars(args), "n_image": subject.n_image, "depth": subject.depth,
              "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip

    def save() -> None:  # after every phase: a stopped run still leaves its figures
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    def refuse(key: str, error: Exception) -> None:
        if key == "unpatched":
            raise error
        rows[key] = {"method": rows[key]["method"], "budget": rows[key]["budget"],
                     "refused": str(error).splitlines()[0]}  # fmt: skip
        active.remove(key)  # a method the family refuses (the library said why)
        print(f"  refused {key}: {rows[key]['refused']}", flush=True)

    def run_once(key: str, feed: dict[str, Any], new: int) -> tuple[Any, float]:
        row = rows[key]
        kwargs, weights = subject.configure(row["method"], row["budget"])
        subject.clock.reset()
        subject.timer.seconds = 0.0
        start = time.perf_counter()
        with torch.inference_mode():
            out = subject.generate(feed, kwargs, new)
        elapsed = time.perf_counter() - start
        if new == 1:
            layer_s = subject.clock.times
            projected = (
                elapsed - sum(layer_s) + sum(w * t for w, t in zip(weights, layer_s, strict=True))
            )
            row["ttft"].append(elapsed)
            row["projected"].append(projected)
            row["method_s"].append(subject.timer.seconds)
            row["tower_s"].append(subject.clock.tower)
            row["lengths"] = list(subject.clock.lengths)
            row.setdefault("layer_s", []).append(list(layer_s))
        return out, elapsed

    # fidelity: one pass per prompt (new tokens); --prompts 0 takes it from the first round
    for p, feed in enumerate([] if args.static_only else subject.feeds[: args.prompts]):
        answers = {}
        for key in list(active):
            try:
                answers[key], _ = run_once(key, feed, args.new_tokens)
            except REFUSALS as error:
                refuse(key, error)
                continue
            print(f"  [{time.strftime('%H:%M:%S')}] prompt {p} {key}", flush=True)
        for key in active:
            fidelity(rows[key], answers["unpatched"], answers[key], args.new_tokens)
    save()
    if not args.no_static:  # FLOPs and memory once
        static(args, subject, rows, active, refuse, save, result)
    for key in active:  # the timing passes start clean
        for field in ("ttft", "projected", "method_s", "tower_s"):
            rows[key][field].clear()
        rows[key].pop("layer_s", None)
    if args.warmup and not args.static_only:  # untimed: the process's first call pays more
        with torch.inference_mode():
            subject.generate(subject.feeds[0], subject.configure("unpatched", 0)[0], 1)
    firsts: dict[str, Any] = {}
    for r in range(0 if args.static_only else args.rounds):
        shift = r % len(active)
        for key in active[shift:] + active[:shift]:
            try:
                out, _ = run_once(key, subject.feeds[0], 1)
            except REFUSALS as error:
                refuse(key, error)
                continue
            if not args.prompts and key not in firsts:  # fidelity from the timed calls
                firsts[key] = out
                if "unpatched" in firsts:  # one prompt, its first token
                    fidelity(rows[key], firsts["unpatched"], out, 1)
            save()
            print(f"  [{time.strftime('%H:%M:%S')}] round {r + 1} {key}", flush=True)
        print(f"  [{time.strftime('%H:%M:%S')}] round {r + 1} done", flush=True)
    subject.timer.close()
    return result


def static(
    args: argparse.Namespace,
    subject: Subject,
    rows: dict[str, dict[str, Any]],
    active: list[str],
    refuse: Callable[[str, Exception], None],
    save: Callable[[], None],
    result: dict[str, Any],
) -> None:
    """Prefill FLOPs and peak bytes per row: split (``TowerSplit``: the tower once, each row
    after it) unless ``--static-whole``; turbo-tower and a method working inside the tower
    are counted whole."""
    split = None
    if not args.static_whole:
        split = TowerSplit(subject.tower)
        kwargs = subject.configure("unpatched", 0)[0]
        with torch.inference_mode():
            split.capture(lambda: subject.generate(subject.feeds[0], kwargs, 1))
        result["static"] = {"split": True, "tower_gflops": split.flops / 1e9 / args.batch,
                            "tower_peak_mib": split.peak / 2**20}  # fmt: skip
        print(
            f"  [{time.strftime('%H:%M:%S')}] static tower: {split.flops / 1e9:.0f} GFLOPs, "
            f"peak {split.peak / 2**20:.0f} MiB",
            flush=True,
        )
    else:
        result["static"] = {"split": False}
    for key in list(active):
        kwargs, _ = subject.configure(rows[key]["method"], rows[key]["budget"])
        parts = [split] if split is not None and rows[key]["method"] != "turbo-tower" else []
        parts.append(None)  # the whole call: turbo-tower, or a method inside the tower
        for part in parts:
            gc.collect()  # a stopped attempt's tensors freed now, not inside the next count
            flops: list[int] = []

            def prefill(
                kwargs: dict[str, Any] = kwargs, flops: list[int] = flops, part: Any = part
            ) -> None:
                scope = part.replay() if part is not None else contextlib.nullcontext()
                with torch.inference_mode(), scope:
                    flops.append(count_flops(lambda: subject.generate(subject.feeds[0], kwargs, 1)))

            try:
                peak = llava_ttft.prefill_peak_bytes(prefill)
            except TowerInside:
                continue  # counted whole (the next part)
            except REFUSALS as error:
                refuse(key, error)
                break
            total = flops[0] + (part.flops if part is not None else 0)
            rows[key]["gflops"] = total / 1e9 / args.batch
            rows[key]["peak_mib"] = peak / 2**20
            rows[key]["static"] = "split" if part is not None else "whole"
            print(
                f"  [{time.strftime('%H:%M:%S')}] static {key} ({rows[key]['static']}): "
                f"{rows[key]['gflops']:.0f} GFLOPs, peak {rows[key]['peak_mib']:.0f} MiB",
                flush=True,
            )
            save()
            break


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per method and budget with medians, intervals and ratios."""
    rows = result["rows"]
    base = rows["unpatched"]
    steady_tower = whole_tower_median(result)
    lines = []
    for key, row in rows.items():
        line: dict[str, Any] = {"key": key, "method": row["method"], "budget": row["budget"]}
        if row.get("refused"):
            line["refused"] = row["refused"]
            lines.append(line)
            continue
        n = min(len(row["ttft"]), len(base["ttft"]))  # rounds both finished (a stopped run)
        med = lambda v: statistics.median(v) if v else None  # noqa: E731
        avg = lambda v: statistics.mean(v) if v else None  # noqa: E731
        speed = [base["ttft"][i] / row["ttft"][i] for i in range(n)]
        proj = [base["projected"][i] / row["projected"][i] for i in range(n)]
        share = [row["method_s"][i] / row["projected"][i] * 100 for i in range(n)]
        steady = _steady_ratios(base, row, n, steady_tower)
        line.update(
            kept=row["lengths"][-1] - (base["lengths"][-1] - result["n_image"]) if row.get("lengths") and base.get("lengths") else None,
            ttft=med(row["ttft"]), tower_s=med(row.get("tower_s", [])), speedup=med(speed), speed_lo=min(speed, default=None),
            speed_hi=max(speed, default=None), proj_ttft=med(row["projected"]),
            proj_speedup=med(proj), proj_lo=min(proj, default=None), proj_hi=max(proj, default=None),
            steady_speedup=med(steady), steady_lo=min(steady, default=None), steady_hi=max(steady, default=None),
            method_share=med(share) if row["method"] not in ("unpatched", "turbo-tower") else None,
            gflops=row.get("gflops"), flops_ratio=(base["gflops"] / row["gflops"]) if row.get("gflops") else None,
            peak_mib=row.get("peak_mib"), kl=avg(row["kl"]),
            first_agree=avg(row["first_agree"]), answer_agree=avg(row["answer_agree"]),
        )  # fmt: skip
        lines.append(line)
    return lines


def whole_tower_median(result: dict[str, Any]) -> float | None:
    """The median time of the unreduced vision tower over every call that ran it whole
    (every row but the tower stage's): the same computation on the same image each time,
    so its spread is the machine's load, not the method."""
    times = [
        t
        for row in result["rows"].values()
        if row.get("method") != "turbo-tower" and not row.get("refused")
        for t in row.get("tower_s", [])
    ]
    return statistics.median(times) if times else None


def _steady_ratios(
    base: dict[str, Any], row: dict[str, Any], n: int, tower: float | None
) -> list[float]:
    """Per round, the projected ratio with every whole tower's time replaced by ``tower``
    (the tower stage's row keeps its own, reduced tower time)."""
    if tower is None or len(base.get("tower_s", [])) < n or len(row.get("tower_s", [])) < n:
        return []
    ratios = []
    for i in range(n):
        unpatched = base["projected"][i] - base["tower_s"][i] + tower
        own = row["tower_s"][i] if row["method"] == "turbo-tower" else tower
        ratios.append(unpatched / (row["projected"][i] - row["tower_s"][i] + own))
    return ratios


def _f(value: Any, spec: str) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return format(value, spec)
    return "-"


def table(result: dict[str, Any]) -> str:
    """The markdown table (measured shallow figures, projection columns labelled)."""
    args = result["args"]
    fidelity = (
        f"{args['prompts']} prompts x {args['new_tokens']} tokens"
        if args["prompts"]
        else "fidelity of the first token of the timing prompt (answer agr = 1st agr)"
    )
    if args.get("static_only"):  # no timing, no fidelity: their columns are "-"
        fidelity = "static pass only (FLOPs and memory; no timing, no fidelity)"
    out = [
        f"{args['model']}{' (tiny)' if args['tiny'] else ''}: batch {args['batch']}, "
        f"{SHALLOW_LAYERS} LLM layers measured, {result['n_image']} image tokens, "
        f"{0 if args.get('static_only') else args['rounds']} rounds, {fidelity}, "
        f"{result['threads']} threads (measured under load from parallel work); "
        f"proj. = PROJECTED to {result['depth']} layers",
        "",
        "| method | budget | image tokens into last layer | GFLOPs (x) | peak MiB | TTFT s "
        "| tower s | TTFT x [min,max] | proj. TTFT s | proj. x [min,max] "
        "| proj. x, tower at median [min,max] | method % of proj. | KL | 1st agr | ans agr |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in summarise(result):
        if line.get("refused"):
            reason = line["refused"][:90].replace("|", "/")
            out.append(f"| {line['method']} | {line['budget']} | refused: {reason} |" + " - |" * 12)
            continue
        out.append(
            f"| {line['method']} | {line['budget'] or 'all'} | {_f(line['kept'], 'd')} "
            f"| {_f(line['gflops'], '.0f')} ({_f(line['flops_ratio'], '.2f')}) "
            f"| {_f(line['peak_mib'], '.0f')} | {_f(line['ttft'], '.2f')} "
            f"| {_f(line['tower_s'], '.2f')} "
            f"| {_f(line['speedup'], '.2f')} [{_f(line['speed_lo'], '.2f')},{_f(line['speed_hi'], '.2f')}] "
            f"| {_f(line['proj_ttft'], '.2f')} | {_f(line['proj_speedup'], '.2f')} "
            f"[{_f(line['proj_lo'], '.2f')},{_f(line['proj_hi'], '.2f')}] "
            f"| {_f(line['steady_speedup'], '.2f')} "
            f"[{_f(line['steady_lo'], '.2f')},{_f(line['steady_hi'], '.2f')}] "
            f"| {_f(line['method_share'], '.2f')} | {_f(line['kl'], '.4f')} "
            f"| {_f(line['first_agree'], '.2f')} | {_f(line['answer_agree'], '.2f')} |"
        )
    steady = whole_tower_median(result)
    if steady is not None:
        out += [
            "",
            f"proj. x, tower at median: the projected ratio with the unreduced vision tower's "
            f"time in every call replaced by its median over all such calls ({steady:.2f} s: "
            "the same computation on the same image, so its spread across calls is the "
            "machine's load); the tower stage's row keeps its own tower time (a PROJECTION).",
        ]
    out += static_note(result)
    bound = bounds(result)
    if bound:
        out += ["", *bound]
    return "\n".join(out)


def static_note(result: dict[str, Any]) -> list[str]:
    """What the GFLOPs and peak MiB columns count (and how: split or whole)."""
    rows = result["rows"]
    if not any("peak_mib" in row for row in rows.values()):
        return []
    note = (
        "GFLOPs: the prefill (generate with one new token), matmul-like ops, per image; "
        "peak MiB: the most bytes torch's CPU allocator held at once during the prefill "
        "(activations, KV cache and logits; not the weights)"
    )
    static = result.get("static") or {}
    whole = [key for key, row in rows.items() if row.get("static") == "whole"]
    if static.get("split"):
        note += (
            f". Both counted split: the vision tower once (the unpatched call: "
            f"{static['tower_gflops']:.0f} GFLOPs, its peak {static['tower_peak_mib']:.0f} MiB "
            "above the bytes live at its entry), plus each row's call with the tower's output "
            "replayed and its peak reserved in its place (exactly the whole call's figures: "
            "the split is checked against the whole call in the tests)"
        )
        if whole:
            note += f"; counted whole (the method acts in the tower): {', '.join(whole)}"
    return ["", note]


def bounds(result: dict[str, Any], target: float | None = None) -> list[str]:
    """Amdahl's bound with the vision tower unreduced, from the measured parts (medians).

    The unpatched projected TTFT is tower + rest (embedding, head, generate's own work) +
    the full-depth LLM layers. A connector or LLM method leaves the tower as it is, so no
    such method beats ``(tower + rest + depth * layer) / (tower + rest)`` (its LLM free),
    and one keeping K image tokens in every layer (at no cost of its own) beats no
    ``... / (tower + rest + depth * layer(K))``, layer(K) being the per-layer time the
    connector rows measured at K. The tower is the median over every row that runs it
    whole (the same computation in each: under load one call's tower varies); rest and
    the full layers are the unpatched rows'. The kept tokens a target ratio needs follow
    from the per-layer time linear in the sequence length between the unpatched and the
    connector rows' lengths. A PROJECTION, like the table's proj. columns."""
    rows = result["rows"]
    base = rows.get("unpatched", {})
    if not base.get("ttft") or not base.get("tower_s"):
        return []
    depth, n_image = result["depth"], result["n_image"]
    target = target or {"llava": 3.0, "qwen2_5_vl": 2.5}.get(result["args"]["model"], 2.5)
    med = statistics.median
    towers = [t for row in rows.values() if row["method"] != "turbo-tower"
              for t in row.get("tower_s", [])]  # fmt: skip
    tower = med(towers)
    layers_u = med(sum(t) for t in base["layer_s"])
    rest = med(base["ttft"]) - med(base["tower_s"]) - layers_u
    proj_u = tower + rest + depth * layers_u / SHALLOW_LAYERS
    full_len = base["lengths"][0]
    out = [
        f"Amdahl bound (tower unreduced; PROJECTED to {depth} layers from medians of the "
        f"measured parts): proj. TTFT {proj_u:.2f} s = tower {tower:.2f} s ({tower / proj_u:.0%}, "
        f"{len(towers)} calls) + rest {rest:.2f} s + {depth} LLM layers "
        f"{proj_u - tower - rest:.2f} s ({full_len} tokens per row); ceiling with the LLM "
        f"free: {proj_u / (tower + rest):.2f}x",
    ]
    for budget in sorted({row["budget"] for row in rows.values() if row.get("budget")}):
        conn = [row for row in rows.values() if row["budget"] == budget
                and row["method"] in CONNECTOR and row.get("layer_s")]  # fmt: skip
        if not conn:
            continue
        layer_k = med(sum(t) / len(t) for row in conn for t in row["layer_s"])
        length_k = conn[0]["lengths"][0]
        ideal = tower + rest + depth * layer_k
        line = (
            f"- {budget} image tokens kept ({budget / n_image:.1%}; {length_k} tokens per row): "
            f"bound {proj_u / ideal:.2f}x (measured layer {layer_k:.3f} s vs "
            f"{layers_u / SHALLOW_LAYERS:.3f} s unpatched)"
        )
        layer_u = layers_u / SHALLOW_LAYERS
        slope = (layer_u - layer_k) / (full_len - length_k) if full_len != length_k else 0.0
        need = (proj_u / target - tower - rest) / depth  # per-layer time the target allows
        if slope > 0:
            length = length_k + (need - layer_k) / slope
            image = length - (full_len - n_image)
            if image <= 0:
                line += f"; {target:g}x is out of reach even with no image tokens"
            else:
                line += f"; {target:g}x needs <= {image:.0f} image tokens ({image / n_image:.1%})"
        out.append(line)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(FULL_DEPTH), default="llava")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=896, help="Qwen image px (896: 1024 tokens)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--prompts", type=int, default=2, help="fidelity prompts (0: the timed rounds' first token)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS[1:], default=None, help="rows (unpatched always)"
    )
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-static", action="store_true", help="skip FLOPs and memory")
    parser.add_argument(
        "--warmup", action="store_true", help="one untimed unpatched call before the rounds"
    )
    parser.add_argument(
        "--static-only", action="store_true", help="FLOPs and memory only (no timing, fidelity)"
    )
    parser.add_argument(
        "--static-json", default=None, help="take FLOPs and memory from a --static-only run's json"
    )
    parser.add_argument(
        "--static-whole",
        action="store_true",
        help="count every row's whole call (default: the tower once, each row after it)",
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="tokens kept")
    parser.add_argument(
        "--tower-layers", type=int, nargs="+", default=[0, 1, 2, 3],
        help="Qwen's tower stage: the blocks after which units merge (ascending, >= 0)",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="tiny configs (smoke test)")
    parser.add_argument("--json", default=None, help="write the raw figures here")
    parser.add_argument(
        "--render", default=None, help="print the table of a saved --json (measure nothing)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.prompts < 0 or args.new_tokens < 1:
        parser.error("--rounds and --new-tokens must be >= 1, --prompts >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # --render: the table of a saved (maybe stopped) run, nothing measured
    result = json.loads(Path(args.render).read_text()) if args.render else measure(args)
    if args.static_json:  # FLOPs and memory measured by another (--static-only) run
        static_run = json.loads(Path(args.static_json).read_text())
        static = static_run["rows"]
        for key, row in result["rows"].items():
            for field in ("gflops", "peak_mib"):
                if field in static.get(key, {}):
                    row[field] = static[key][field]
            if "static" in static.get(key, {}):
                row["static"] = static[key]["static"]
        if "static" in static_run:
            result["static"] = static_run["static"]
    if args.json and not args.render:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
