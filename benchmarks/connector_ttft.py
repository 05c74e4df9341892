"""The connector stage on this CPU: time to first token at 64 / 128 / 192 image tokens kept
(or the same fractions for Qwen's dynamic counts) against the unpatched model.

``--model llava`` (default): LLaVA-1.5's shapes (the CLIP ViT-L/14 tower at 336 px at full
size, 576 image tokens; a LLaMA-7B-wide language model shrunk to ``--llm-layers``), built
by ``benchmarks/llava_ttft.py``. ``--model qwen2_5_vl``: Qwen2.5-VL-7B's shapes (its
32-layer window-attention tower at full size, 1280 wide; a language model 3584 wide with
28 heads / 4 KV heads and MLP 18944, shrunk in depth; vocabulary cut to 32064 and tied to
save memory), a ``--size`` px image (336: 576 patches, 144 tokens).

Random weights: this measures speed, not quality. The connector method is ``--method``
(a name in turbo_core's connector registry); when it is not registered the benchmark
registers ``bench-guide-merge``, written here: keep the top-K tokens by the guide (CLS
attention where the family gives one, else the feature norm), average every other token
into its most similar kept token (cosine, size-weighted).

Per round, the modes run interleaved (unpatched, then each budget): ``generate`` with one
new token. Reported: median TTFT per mode; speedup = median of per-round ratios to the
unpatched run, with [min, max] over rounds; the decoder layers' own time (hooks on each
layer) and the connector method's time inside the same calls. Projection to full depth
(LLaVA-1.5-7B: 32 layers, Qwen2.5-VL-7B: 28): TTFT - layers + depth * (layers / count),
per round, labelled as a projection.

Usage: python benchmarks/connector_ttft.py [--model llava|qwen2_5_vl --rounds 5 --batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import turbo_adapters as ta
from turbo_adapters.connector import ConnectorReduction, last_connector
from turbo_core.connector import (
    CONNECTOR_METHODS,
    ConnectorInputs,
    ReducedTokens,
    register_connector_method,
)

sys.path.insert(0, str(Path(__file__).parent))
import llava_ttft

FULL_DEPTH = {"llava": 32, "qwen2_5_vl": 28}
BUDGETS = {"llava": (64, 128, 192), "qwen2_5_vl": (64 / 576, 128 / 576, 192 / 576)}
METHOD_SECONDS: list[float] = []


def guide_merge(inputs: ConnectorInputs, budget: int) -> ReducedTokens:
    """Keep the top-``budget`` tokens by guide; merge the others into their most similar kept."""
    start = time.perf_counter()
    x = inputs.features
    batch, n, _ = x.shape
    score = inputs.guide if inputs.guide is not None else x.norm(dim=-1)
    index = score.topk(budget, dim=-1).indices.sort(-1).values  # (B, K)
    kept = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    kept.scatter_(1, index, True)
    metric = F.normalize(inputs.keys if inputs.keys is not None else x, dim=-1)
    sim = metric @ metric.gather(1, index[..., None].expand(-1, -1, metric.shape[-1])).transpose(
        1, 2
    )
    target = sim.argmax(-1)  # (B, N): most similar kept token of every token
    target = torch.where(kept, kept.cumsum(-1) - 1, target)  # kept tokens go to themselves
    total = x.new_zeros(batch, budget, x.shape[-1]).scatter_add_(
        1, target[..., None].expand(-1, -1, x.shape[-1]), x
    )
    sizes = x.new_zeros(batch, budget).scatter_add_(1, target, x.new_ones(batch, n))
    METHOD_SECONDS.append(time.perf_counter() - start)
    return ReducedTokens(total / sizes[..., None], sizes, index)


# --------------------------------------------------------------------- Qwen2.5-VL
def build_qwen(llm_layers: int) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                       "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14,
                       "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        text_config={"hidden_size": 3584, "intermediate_size": 18944,
                     "num_hidden_layers": llm_layers, "num_attention_heads": 28,
                     "num_key_value_heads": 4, "vocab_size": 32064, "pad_token_id": 0,
                     "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [16, 24, 24]}},
        image_token_id=32000, video_token_id=32001, vision_start_token_id=32002,
        vision_end_token_id=32003, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    llava_ttft._informative_llm(model.model.language_model)
    model.generation_config.pad_token_id = 0
    return model


def qwen_inputs(batch: int, size: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = size // 14
    tokens = side * side // 4
    prompts = []
    for b in range(batch):
        question = torch.randint(100, 30000, (8 + 3 * b,), generator=g).tolist()
        prompts.append([1, 3148, 32002, *[32000] * tokens, 32003, *question, 319, 29901])
    width = max(len(p) for p in prompts)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    pixels = torch.randn(batch * side * side, 3 * 2 * 14 * 14, generator=g)
    return {
        "input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, side, side]] * batch),
        "mm_token_type_ids": (ids == 32000).long(),
    }  # fmt: skip


# --------------------------------------------------------------------- timing
class LayerClock:
    """Seconds spent inside the decoder layers (pre/post hooks on each)."""

    def __init__(self, layers: Any) -> None:
        self.total = 0.0
        self._start = 0.0
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._enter))
            self.handles.append(layer.register_forward_hook(self._leave))

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(FULL_DEPTH), default="llava")
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--method", default="turbo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    method = args.method
    if method not in CONNECTOR_METHODS:
        method = "bench-guide-merge"
        register_connector_method(method, guide_merge)
    if args.model == "llava":
        model = llava_ttft.build(args.llm_layers, "medium")
        feed = llava_ttft.inputs(args.batch, "medium")
        layers = model.model.language_model.layers
    else:
        model = build_qwen(args.llm_layers)
        feed = qwen_inputs(args.batch, args.size)
        layers = model.model.language_model.layers
    patch = ta.apply(model)
    clock = LayerClock(layers)
    modes = [
        "unpatched",
        *[f"keep {b:g}" if isinstance(b, int) else f"keep {b:.3f}" for b in BUDGETS[args.model]],
    ]
    budgets = dict(zip(modes[1:], BUDGETS[args.model], strict=True))
    times: dict[str, list[float]] = {m: [] for m in modes}
    layer_times: dict[str, list[float]] = {m: [] for m in modes}
    method_times: dict[str, list[float]] = {m: [] for m in modes}
    kept: dict[str, tuple[int, ...]] = {}

    def run(mode: str) -> float:
        kwargs = {"turbo_mode": "none"}
        if mode != "unpatched":
            patch.connector = ConnectorReduction(budget=budgets[mode], method=method)
            kwargs = {"turbo_mode": "connector"}
        clock.total = 0.0
        METHOD_SECONDS.clear()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**feed, max_new_tokens=1, min_new_tokens=1, do_sample=False, **kwargs)
        elapsed = time.perf_counter() - start
        layer_times[mode].append(clock.total)
        method_times[mode].append(sum(METHOD_SECONDS))
        if mode != "unpatched":
            kept[mode] = last_connector(patch).tokens_out
        return elapsed

    for mode in modes:  # warm-up
        run(mode)
        for d in (times, layer_times, method_times):
            d[mode].clear()
    for r in range(args.rounds):
        for mode in modes:
            times[mode].append(run(mode))
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in modes), flush=True)

    depth = FULL_DEPTH[args.model]
    count = len(layers)

    def projected(mode: str, i: int) -> float:
        return times[mode][i] - layer_times[mode][i] + depth * layer_times[mode][i] / count

    print(f"\n{args.model}: batch {args.batch}, {count} LLM layers, method {method}, "
          f"{args.rounds} rounds (measured under load from parallel work)")  # fmt: skip
    header = f"{'mode':<12}{'kept/img':>10}{'TTFT s':>9}{'speedup [min,max]':>24}{'layers s':>10}{'method %':>10}"
    print(header + f"{'proj. TTFT s':>14}{'proj. speedup [min,max]':>26}")
    for mode in modes:
        ratios = [times["unpatched"][i] / times[mode][i] for i in range(args.rounds)]
        proj = [projected(mode, i) for i in range(args.rounds)]
        proj_ratios = [projected("unpatched", i) / proj[i] for i in range(args.rounds)]
        share = [method_times[mode][i] / times[mode][i] * 100 for i in range(args.rounds)]
        print(
            f"{mode:<12}{kept.get(mode, 'all')!s:>10}{statistics.median(times[mode]):>9.2f}"
            f"{statistics.median(ratios):>10.2f}x [{min(ratios):.2f},{max(ratios):.2f}]"
            f"{statistics.median(layer_times[mode]):>10.2f}{statistics.median(share):>9.2f}%"
            f"{statistics.median(proj):>14.2f}{statistics.median(proj_ratios):>12.2f}x "
            f"[{min(proj_ratios):.2f},{max(proj_ratios):.2f}]"
        )
    print(f"projection: full depth {depth} layers from the measured per-layer time (a projection, "
          "not a measurement)")  # fmt: skip


if __name__ == "__main__":
    main()
