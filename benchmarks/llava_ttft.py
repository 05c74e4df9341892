"""LLaVA-1.5 and MiniGPT-v2 with Turbo on this CPU: time to first token, tokens/s,
prefill FLOPs and prefill peak memory.

``--model llava`` (default), a medium config with LLaVA-1.5 shapes: the CLIP
ViT-L/14 tower at 336 px at full size (24 layers, width 1024, 577 tokens), the 2-layer
MLP projector, and a LLaMA-7B-wide language model (width 4096, 32 heads, MLP 11008,
vocab 32064, tied input/output embeddings to save memory) shrunk in depth
(``--llm-layers``, default 2). Tower mode at ``--r`` (default 20, the default preset).

``--model minigpt``, a medium MiniGPT-v2: the EVA ViT-g/14 tower at 448 px at full
size (39 blocks, width 1408, 1025 tokens; timm ``Eva``), LayerNorm, CLS dropped, 4-token
concatenation (256 image tokens), the projection, and the same shallow LLaMA-7B-wide
language model (vocab 32000, tied) with LoRA r 64 on q/v (peft). Tower mode uses the
``reference-minigpt-v2`` preset at ``--r`` (default 12, the paper's; the adapter keeps
the count at the concatenation a multiple of 4). Its tower alone has 0.99 B parameters,
the whole model 1.55 B (6.2 GB in float32) with 2 LLM layers: expect the MiniGPT
figures to take several times LLaVA's.

Random weights (seeded; language-model and projection linear layers at
1.2/sqrt(fan_in) so greedy answers are not degenerate): quality is fidelity to the
unpatched model, not accuracy.

Modes, all on one patched model and selected per call (``turbo_mode``):
  unpatched  turbo_mode="none" (the library's own forward and generate)
  tower      Turbo in the vision tower at --r (placeholders / image tokens shortened)
  llm        FastV-style at decoder layer --layer keeping --keep of the image tokens
  both       tower and llm

Per batch size: TTFT (generate with 1 new token), median over --repeats interleaved
rounds, speedup = median per-round ratio over unpatched; tokens/s of one generate
with --new-tokens tokens per mode (prefill included); prefill GFLOPs per row
(turbo_eval.measure.count_flops on a batch-1 prefill, fused attention included);
prefill peak memory (below); first-token agreement, first-token logit KL(unpatched ||
mode), answer agreement (rows whose --new-tokens greedy tokens all equal unpatched's)
and token agreement.

Peak memory: the most bytes torch's CPU allocator held at once for allocations made
during one prefill (activations, KV cache, logits; the weights, allocated before, are
not in it), read from ``torch.profiler.profile(profile_memory=True)``: its trace's
"[memory]" events carry the allocator's running "Total Allocated". It counts the
temporaries that kernels allocate through torch (e.g. inside fused attention), unlike
a tensor-level tracker, and is deterministic, unlike RSS; scratch that oneDNN/MKL
allocate outside torch's allocator is not in it. Measured in a separate prefill per
mode (the profiler slows the call; its time is not used). The prefill is the model's
forward with ``logits_to_keep=1`` for LLaVA, and ``generate`` with one new token for
MiniGPT-v2 (whose LLM mode acts inside ``generate``).

Usage: python benchmarks/llava_ttft.py [--model llava|minigpt --batch 1 4 --r 20
    --layer 1 --keep 0.25] [--device cuda --dtype bfloat16]

On CUDA the peak memory is ``torch.cuda.max_memory_allocated`` over the prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchmark_target import Target, add_target_arguments, target
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import turbo_adapters as ta
from turbo_adapters.families.llava.llm import LLMReduction
from turbo_eval.measure import count_flops, peak_memory

IMAGE_TOKEN = 32000
PAD = 0

#: (image size, tower width, tower layers, heads, LLM width, LLM MLP, LLM heads)
SHAPES = {
    "medium": (336, 1024, 24, 16, 4096, 11008, 32),
    "tiny": (56, 64, 4, 4, 64, 128, 4),  # a smoke test of this script
}
#: MiniGPT-v2: (image size, tower width, tower blocks, heads, MLP ratio, LLM width, LLM
#: MLP, LLM heads, LoRA r)
MINIGPT_SHAPES = {
    "medium": (448, 1408, 39, 16, 6144 / 1408, 4096, 11008, 32, 64),
    "tiny": (56, 64, 4, 4, 2.0, 64, 128, 4, 4),  # a smoke test of this script
}


def _informative_llm(*parts: torch.nn.Module) -> None:
    """Linear weights at 1.2/sqrt(fan_in): greedy answers that vary with the input."""
    with torch.no_grad():
        for part in parts:
            for weight in (p for p in part.parameters() if p.dim() == 2):
                weight.normal_(0.0, 1.2 / weight.shape[1] ** 0.5)


def _llama(llm_layers: int, width: int, mlp: int, heads: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=llm_layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
        pad_token_id=PAD, tie_word_embeddings=True,  # one vocab-row matrix: memory
    )  # fmt: skip


# --------------------------------------------------------------------- LLaVA
def build(llm_layers: int, shape: str = "medium", seed: int = 0) -> LlavaForConditionalGeneration:
    size, width, depth, heads, llm_width, llm_mlp, llm_heads = SHAPES[shape]
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
        num_attention_heads=heads, image_size=size, patch_size=14, hidden_act="quick_gelu",
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=_llama(llm_layers, llm_width, llm_mlp, llm_heads, 32064),
        image_token_id=IMAGE_TOKEN, image_seq_length=(size // 14) ** 2,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    _informative_llm(model.model.language_model, model.model.multi_modal_projector, model.lm_head)
    model.generation_config.pad_token_id = PAD
    return model


def inputs(batch: int, shape: str = "medium", seed: int = 1) -> dict[str, torch.Tensor]:
    """One image per row, prompts of different lengths (left padded)."""
    size = SHAPES[shape][0]
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for b in range(batch):
        question = torch.randint(100, 30000, (8 + 3 * b,), generator=g).tolist()
        image = [IMAGE_TOKEN] * (size // 14) ** 2
        prompts.append([1, 3148, 1001, 29901, *image, 13, *question, 319, 1799, 29901])
    width = max(len(p) for p in prompts)
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def greedy(model: Any, feed: dict[str, torch.Tensor], mode: str, new: int) -> Any:
    return model.generate(
        **feed, max_new_tokens=new, min_new_tokens=new, do_sample=False, turbo_mode=mode,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip


# ---------------------------------------------------------------- MiniGPT-v2
def build_minigpt(llm_layers: int, shape: str = "medium", seed: int = 0) -> Any:
    from turbo_adapters.models import MiniGPTv2, MiniGPTv2Config

    size, width, depth, heads, ratio, llm_width, llm_mlp, llm_heads, lora = MINIGPT_SHAPES[shape]
    torch.manual_seed(seed)
    config = MiniGPTv2Config(
        image_size=size, patch_size=14, vision_width=width, vision_depth=depth,
        vision_heads=heads, vision_mlp_ratio=ratio, lora_r=lora, lora_alpha=16,
        llama=_llama(llm_layers, llm_width, llm_mlp, llm_heads, 32000),
    )  # fmt: skip
    model = MiniGPTv2(config).eval()
    _informative_llm(model.llama_model, model.llama_proj)  # LoRA A and B included
    return model


def minigpt_inputs(batch: int, shape: str = "medium", seed: int = 1) -> dict[str, Any]:
    """``[INST] <Img>`` image ``</Img> [vqa] question [/INST]``-like ids, questions of
    different lengths (left padded by the model)."""
    size = MINIGPT_SHAPES[shape][0]
    g = torch.Generator().manual_seed(seed)
    before = [[1, 518, 25580, 29962, 529, 25518, 29958] for _ in range(batch)]
    questions = [
        torch.randint(100, 30000, (8 + 3 * b,), generator=g).tolist() for b in range(batch)
    ]
    after = [
        [1533, 25518, 29958, 518, 29894, 25621, 29962, *q, 518, 29914, 25580, 29962]
        for q in questions
    ]
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {"pixels": pixels, "before": before, "after": after}


def minigpt_greedy(model: Any, feed: dict[str, Any], mode: str, new: int) -> Any:
    return model.generate(
        feed["pixels"], feed["before"], feed["after"], pad_token_id=PAD, max_new_tokens=new,
        min_new_tokens=new, turbo_mode=mode, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip


# -------------------------------------------------------------------- memory
def prefill_peak_bytes(fn: Callable[[], Any]) -> int:
    """The most bytes torch's CPU allocator held at once for allocations made in ``fn()``.

    From the "[memory]" events of ``torch.profiler`` with ``profile_memory=True``:
    each carries the allocator's running "Total Allocated" (which counts only what was
    allocated while a profiler recorded memory), so the peak over the call minus the
    total before its first allocation is the call's own peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]"),
        key=lambda e: (float(e["ts"]), e["args"].get("Ev Idx", 0)),
    )
    cpu = [e["args"] for e in memory if e["args"].get("Device Type", 0) == 0]
    if not cpu:
        raise RuntimeError("the profiler recorded no CPU memory events for the prefill")
    before = cpu[0]["Total Allocated"] - cpu[0]["Bytes"]
    return int(max(a["Total Allocated"] for a in cpu) - before)


# ---------------------------------------------------------------------- main
def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def subject(
    args: argparse.Namespace, where: Target
) -> tuple[Any, Callable[..., Any], Callable[..., Any], str]:
    """The patched model, ``feed(batch)``, ``greedy(feed, mode, new)`` and a description."""
    llm = LLMReduction(layer=args.layer, keep=args.keep, method=args.method)
    if args.model == "llava":
        model = where.to(build(args.llm_layers, args.shape))
        patch = ta.apply(model, r=args.r)
        patch.llm = llm
        text = f"LLaVA-1.5 {args.shape} {SHAPES[args.shape]} (image, tower width/layers/heads, LLM width/MLP/heads)"
        return model, lambda b: where.to(inputs(b, args.shape)), greedy, text
    model = where.to(build_minigpt(args.llm_layers, args.shape))
    patch = ta.apply(model, "reference-minigpt-v2", r=args.r)
    patch.llm = llm
    text = (
        f"MiniGPT-v2 {args.shape} {MINIGPT_SHAPES[args.shape]} (image, tower width/blocks/"
        "heads/MLP ratio, LLM width/MLP/heads, LoRA r); tower preset reference-minigpt-v2"
    )
    return model, lambda b: where.to(minigpt_inputs(b, args.shape)), minigpt_greedy, text


def prefill_fn(args: argparse.Namespace, model: Any, feed: Any, mode: str) -> Callable[[], Any]:
    """One prefill: LLaVA's forward (last logits only), MiniGPT-v2's 1-token generate."""
    if args.model == "llava":
        return lambda: model(**feed, turbo_mode=mode, logits_to_keep=1)
    return lambda: minigpt_greedy(model, feed, mode, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llava", choices=["llava", "minigpt"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--r", type=int, default=None, help="tower r (llava 20, minigpt 12)")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--method", default="prune", choices=["prune", "merge"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["none", "tower", "llm", "both"])
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--shape", default="medium", choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOPs count")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory")
    parser.add_argument(
        "--no-answers", action="store_true", help="TTFT only (no --new-tokens answers)"
    )
    add_target_arguments(parser)
    args = parser.parse_args()
    where = target(args)
    sync = where.synchronize or (lambda: None)
    if args.r is None:
        args.r = 20 if args.model == "llava" else 12
    if args.threads:
        torch.set_num_threads(args.threads)

    model, make_feed, generate, text = subject(args, where)
    results: dict[str, Any] = {"args": vars(args), "batches": {}}
    print(f"{text} x {args.llm_layers} LLM layers")
    print(
        f"tower r={args.r}; llm K={args.layer} keep={args.keep} {args.method}; "
        f"{where}, {torch.get_num_threads()} threads"
    )
    with torch.inference_mode():
        flops = {}  # per row: FLOPs scale with the batch
        for mode in args.modes if not args.no_flops else ():
            flops[mode] = count_flops(prefill_fn(args, model, make_feed(1), mode))
            log(f"prefill FLOPs {mode}: {flops[mode] / 1e9:.0f} G per row")
        generate(model, make_feed(1), "none", 1)  # warm-up
        for batch in args.batch:
            feed = make_feed(batch)
            memory = {}
            for mode in args.modes if not args.no_memory else ():
                prefill = prefill_fn(args, model, feed, mode)
                if where.device.type == "cuda":
                    memory[mode] = peak_memory(prefill, where.device)
                else:
                    memory[mode] = prefill_peak_bytes(prefill)
                log(f"batch {batch} {mode}: prefill peak {memory[mode] / 2**20:.0f} MiB")
            ttft: dict[str, list[float]] = {m: [] for m in args.modes}
            first_out: dict[str, Any] = {}
            for round_ in range(args.repeats):  # interleaved, one mode later each round
                shift = round_ % len(args.modes)
                for mode in args.modes[shift:] + args.modes[:shift]:
                    sync()
                    start = time.perf_counter()
                    first_out[mode] = generate(model, feed, mode, 1)
                    sync()
                    ttft[mode].append(time.perf_counter() - start)
                    log(f"batch {batch} round {round_} {mode}: TTFT {ttft[mode][-1]:.2f} s")
            outputs, total = {}, {}
            for mode in args.modes if not args.no_answers else ():
                sync()
                start = time.perf_counter()  # one full answer per mode: tokens/s, agreement
                outputs[mode] = generate(model, feed, mode, args.new_tokens)
                sync()
                total[mode] = time.perf_counter() - start
                log(f"batch {batch} {mode}: {args.new_tokens} tokens in {total[mode]:.2f} s")
            ref_first = first_out["none"].logits[0].float().log_softmax(-1)
            new = slice(-args.new_tokens, None)  # LLaVA returns the prompt in front
            rows = {}
            for mode in args.modes:
                first = first_out[mode].logits[0].float().log_softmax(-1)
                speed = [b / t for b, t in zip(ttft["none"], ttft[mode], strict=True)]
                row: dict[str, Any] = {
                    "ttft_s": statistics.median(ttft[mode]),
                    "ttft_speedup": statistics.median(speed),
                    "prefill_gflops_per_row": flops[mode] / 1e9 if flops else None,
                    "prefill_peak_mib": memory[mode] / 2**20 if memory else None,
                    "first_token_agreement": (first.argmax(-1) == ref_first.argmax(-1))
                    .float()
                    .mean()
                    .item(),
                    "first_token_kl": (ref_first.exp() * (ref_first - first)).sum(-1).mean().item(),
                    "ttft_rounds": ttft[mode],
                }
                if outputs:
                    same = outputs[mode].sequences[:, new] == outputs["none"].sequences[:, new]
                    row["tokens_per_s"] = batch * args.new_tokens / total[mode]
                    row["tokens_per_s_ratio"] = total["none"] / total[mode]
                    row["answer_agreement"] = same.all(-1).float().mean().item()
                    row["token_agreement"] = same.float().mean().item()
                rows[mode] = row
            print(
                f"\nbatch {batch} (TTFT: median of {args.repeats} rounds; GFLOPs per row; "
                "peak MiB: allocated during the whole batch's prefill)"
            )
            print(
                f"{'mode':8} {'TTFT s':>8} {'TTFT x':>7} {'peak MiB':>9} {'mem x':>6} "
                f"{'tok/s':>7} {'tok/s x':>8} {'GFLOPs':>8} {'FLOPs x':>8} {'1st agr':>8} "
                f"{'KL':>8} {'ans agr':>8} {'tok agr':>8}"
            )
            for mode, row in rows.items():
                print(
                    f"{mode:8} {row['ttft_s']:8.2f} {row['ttft_speedup']:7.2f} "
                    f"{_fmt(row['prefill_peak_mib'], 9, '.0f')} "
                    f"{_fmt(memory and memory['none'] / memory[mode], 6)} "
                    f"{_fmt(row.get('tokens_per_s'), 7)} {_fmt(row.get('tokens_per_s_ratio'), 8)} "
                    f"{_fmt(row['prefill_gflops_per_row'], 8, '.0f')} "
                    f"{_fmt(flops and flops['none'] / flops[mode], 8)} "
                    f"{row['first_token_agreement']:8.2f} {row['first_token_kl']:8.4f} "
                    f"{_fmt(row.get('answer_agreement'), 8)} {_fmt(row.get('token_agreement'), 8)}"
                )
            results["batches"][str(batch)] = rows
            if args.json:  # after every batch size: a later one may not finish
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


def _fmt(value: Any, width: int, spec: str = ".2f") -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


if __name__ == "__main__":
    main()
