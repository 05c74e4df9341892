"""LLaVA-1.5 with Turbo on this CPU: time to first token, tokens/s and prefill FLOPs.

A medium config with LLaVA-1.5 shapes: the CLIP ViT-L/14 tower at 336 px at full
size (24 layers, width 1024, 577 tokens), the 2-layer MLP projector, and a
LLaMA-7B-wide language model (width 4096, 32 heads, MLP 11008, vocab 32064, tied
input/output embeddings to save memory) shrunk in depth (``--llm-layers``, default 2). Random weights (seeded; linear layers at
1.2/sqrt(fan_in) so greedy answers are not degenerate): quality is fidelity to the
unpatched model, not accuracy.

Modes, all on one patched model and selected per call (``turbo_mode``):
  unpatched  turbo_mode="none" (the library's own forward and generate)
  tower      Turbo in the CLIP tower at --r, placeholder runs shortened
  llm        FastV-style at decoder layer --layer keeping --keep of the image tokens
  both       tower and llm

Per batch size: TTFT (generate with 1 new token), median over --repeats interleaved
rounds, speedup = median per-round ratio over unpatched; tokens/s of one generate
with --new-tokens tokens per mode (prefill included); prefill GFLOPs per row
(turbo_eval.measure.count_flops on a batch-1 forward, fused attention included);
first-token agreement, first-token logit KL(unpatched || mode), answer agreement
(rows whose --new-tokens greedy tokens all equal unpatched's) and token agreement.

Usage: python benchmarks/llava_ttft.py [--batch 1 4 --r 20 --layer 1 --keep 0.25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import turbo_adapters as ta
from turbo_adapters.families.llava_llm import LLMReduction
from turbo_eval.measure import count_flops

IMAGE_TOKEN = 32000
PAD = 0


#: (image size, tower width, tower layers, heads, LLM width, LLM MLP, LLM heads)
SHAPES = {
    "medium": (336, 1024, 24, 16, 4096, 11008, 32),
    "tiny": (56, 64, 4, 4, 64, 128, 4),  # a smoke test of this script
}


def build(llm_layers: int, shape: str = "medium", seed: int = 0) -> LlavaForConditionalGeneration:
    size, width, depth, heads, llm_width, llm_mlp, llm_heads = SHAPES[shape]
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
        num_attention_heads=heads, image_size=size, patch_size=14, hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=llm_width, intermediate_size=llm_mlp, num_hidden_layers=llm_layers,
        num_attention_heads=llm_heads, num_key_value_heads=llm_heads, vocab_size=32064,
        pad_token_id=PAD, tie_word_embeddings=True,  # one 32064-row matrix: memory
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
        image_seq_length=(size // 14) ** 2,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for part in (model.model.language_model, model.model.multi_modal_projector, model.lm_head):
            for weight in (p for p in part.parameters() if p.dim() == 2):
                weight.normal_(0.0, 1.2 / weight.shape[1] ** 0.5)
    model.generation_config.pad_token_id = PAD
    return model


def inputs(batch: int, shape: str = "medium", seed: int = 1) -> dict[str, torch.Tensor]:
    """One image per row, prompts of different lengths (left padded)."""
    size = SHAPES[shape][0]
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for b in range(batch):
        question = torch.randint(100, 30000, (8 + 3 * b,), generator=g).tolist()
        prompts.append(
            [
                1,
                3148,
                1001,
                29901,
                *[IMAGE_TOKEN] * (size // 14) ** 2,
                13,
                *question,
                319,
                1799,
                29901,
            ]
        )
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


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--r", type=int, default=20)
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
    parser.add_argument(
        "--no-answers", action="store_true", help="TTFT only (no --new-tokens answers)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args.llm_layers, args.shape)
    patch = ta.apply(model, r=args.r)
    patch.llm = LLMReduction(layer=args.layer, keep=args.keep, method=args.method)
    results: dict[str, Any] = {"args": vars(args), "batches": {}}
    print(
        f"LLaVA-1.5 {args.shape} {SHAPES[args.shape]} (image, tower width/layers/heads, "
        f"LLM width/MLP/heads) x {args.llm_layers} LLM layers"
    )
    print(
        f"tower r={args.r}; llm K={args.layer} keep={args.keep} {args.method}; {torch.get_num_threads()} threads"
    )
    with torch.inference_mode():
        flops = {}  # per row: FLOPs scale with the batch
        for mode in args.modes if not args.no_flops else ():
            one = inputs(1, args.shape)
            flops[mode] = count_flops(
                lambda m=mode, f=one: model(**f, turbo_mode=m, logits_to_keep=1)
            )
            log(f"prefill FLOPs {mode}: {flops[mode] / 1e9:.0f} G per row")
        greedy(model, inputs(1, args.shape), "none", 1)  # warm-up
        for batch in args.batch:
            feed = inputs(batch, args.shape)
            ttft: dict[str, list[float]] = {m: [] for m in args.modes}
            first_out: dict[str, Any] = {}
            for round_ in range(args.repeats):  # interleaved, one mode later each round
                shift = round_ % len(args.modes)
                for mode in args.modes[shift:] + args.modes[:shift]:
                    start = time.perf_counter()
                    first_out[mode] = greedy(model, feed, mode, 1)
                    ttft[mode].append(time.perf_counter() - start)
                    log(f"batch {batch} round {round_} {mode}: TTFT {ttft[mode][-1]:.2f} s")
            outputs, total = {}, {}
            for mode in args.modes if not args.no_answers else ():
                start = time.perf_counter()  # one full answer per mode: tokens/s, agreement
                outputs[mode] = greedy(model, feed, mode, args.new_tokens)
                total[mode] = time.perf_counter() - start
                log(f"batch {batch} {mode}: {args.new_tokens} tokens in {total[mode]:.2f} s")
            ref_first = first_out["none"].logits[0].float().log_softmax(-1)
            new = slice(feed["input_ids"].shape[1], None)
            rows = {}
            for mode in args.modes:
                first = first_out[mode].logits[0].float().log_softmax(-1)
                speed = [b / t for b, t in zip(ttft["none"], ttft[mode], strict=True)]
                row: dict[str, Any] = {
                    "ttft_s": statistics.median(ttft[mode]),
                    "ttft_speedup": statistics.median(speed),
                    "prefill_gflops_per_row": flops[mode] / 1e9 if flops else None,
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
            print(f"\nbatch {batch} (TTFT: median of {args.repeats} rounds; GFLOPs per row)")
            print(
                f"{'mode':8} {'TTFT s':>8} {'TTFT x':>7} {'tok/s':>7} {'tok/s x':>8} {'GFLOPs':>8} "
                f"{'FLOPs x':>8} {'1st agr':>8} {'KL':>8} {'ans agr':>8} {'tok agr':>8}"
            )
            for mode, row in rows.items():
                print(
                    f"{mode:8} {row['ttft_s']:8.2f} {row['ttft_speedup']:7.2f} "
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
