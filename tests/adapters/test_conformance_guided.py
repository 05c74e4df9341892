"""Cross-modal guidance through the conformance kit (turbo_adapters.testing).

The kit's ``r`` is the guided step's: ``use_cross_modal_guidance(patch, r)`` reduces the
image once more between the vision tower and the layers that cross-attend to it, ranked
by the first cross-attention (BLIP: the text's; BLIP-2 / InstructBLIP: the Q-Former
queries'). The kit counts that step, one "block" whose count is the image tokens every
cross-attention reads; its block is the first cross-attention, the module that ranks.
Two cases run the step alone (the tower at r = 0: the step sees the full image); two let
the tower merge first, so sizes flow into the step (and, for InstructBLIP, into the
``log(size)`` the Q-Former's cross-attentions and the ranking add).

The float64 oracle of the step is written here: the unpatched first cross-attention's
q and k (its own modules), the rows' attention over the image averaged over heads and
pooled (mean over real text tokens, or max), the loop-based plan and merge of
``tests/core/oracle.py`` (or the kept tokens for pruning), then the library's own
cross-attention over that image.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support.tiny_blip import PAD, images, text  # noqa: E402
from support.tiny_blip import build as build_blip  # noqa: E402
from support.tiny_blip2_guided import build as build_blip2  # noqa: E402
from support.tiny_blip2_guided import itm, prompt, words  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.families import blip, blip2  # noqa: E402
from turbo_adapters.testing import Case, KitOps, expected_counts, oracle, parametrize, run_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = 17  # 16 patches + CLS of the tiny towers (32 px, patch 8)
DEPTH = 4  # vision layers of the tiny towers
SITE = blip.CROSS_SITE


class GuidedOps(KitOps):
    """The kit's ``r`` on the guided site; its counts are the image tokens read.

    ``counts`` is the guided site's one count, after checking that every cross-attention
    over the image read exactly that many tokens in the last call (forward pre-hooks on
    the attentions, removed with the patch); ``source`` follows a tower token through
    the tower's merges and the step.

    Args:
        family: ``blip`` or ``blip2`` (the module with ``use_cross_modal_guidance``).
        reader: the submodule that holds the cross-attentions (one call per model call).
        cross: ``cross(model)`` -> every cross-attention over the image, in order: the
            modules with ``query``/``key``/``value`` that receive the image.
        mask: the name under which the first cross-attention block takes the image mask.
        tower_r: r per vision block whenever the kit's r is not 0 (0: the step alone).
        reduce, pool: the guided step's options.
        size_bias: also ``use_size_bias_downstream`` (BLIP-2 / InstructBLIP).
        rows: ``rows(args)`` -> ``(B, T)`` weights of the ranking rows (text padding),
            or None: every row counts.
    """

    def __init__(
        self,
        family: Any,
        reader: str,
        cross: Callable[[nn.Module], list[nn.Module]],
        mask: str,
        *,
        tower_r: int = 0,
        reduce: str = "merge",
        pool: str = "mean",
        size_bias: bool = False,
        rows: Callable[[tuple[Any, ...]], torch.Tensor | None] | None = None,
    ) -> None:
        self.family, self.reader, self.cross, self.mask = family, reader, cross, mask
        self.tower_r, self.reduce, self.pool, self.size_bias = tower_r, reduce, pool, size_bias
        self.rows = rows or (lambda args: None)
        self._reads = threading.local()  # image lengths the cross-attentions read, per thread

    def _tower(self, r: Any) -> int:
        return 0 if isinstance(r, int) and r == 0 else self.tower_r

    def apply(self, model: nn.Module, r: Any, **config: Any) -> Any:
        patch = ta.apply(model, r=self._tower(r), **config)
        self.family.use_cross_modal_guidance(patch, r, reduce=self.reduce, pool=self.pool)
        if self.size_bias:
            self.family.use_size_bias_downstream(patch)
        reads = self._reads

        def start(module: nn.Module, args: Any) -> None:
            reads.lengths = []

        def read(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            reads.lengths.append(kwargs["encoder_hidden_states"].shape[1])

        handles = [model.get_submodule(self.reader).register_forward_pre_hook(start)]
        handles += [a.register_forward_pre_hook(read, with_kwargs=True) for a in self.cross(model)]
        for handle in handles:
            patch.add_cleanup(handle.remove)
        return patch

    def set_r(self, patch: Any, r: Any) -> None:
        patch.configure(site=SITE, r=r)
        patch.configure(site="vision", r=self._tower(r))

    def state(self, patch: Any) -> Any:
        return patch.sites[SITE].last_state

    def counts(self, patch: Any) -> list[int]:
        counts = list(self.state(patch).token_counts)
        read = getattr(self._reads, "lengths", [])
        assert read == counts * len(self.cross(patch.model)), (read, counts)
        return counts

    def expected(self, case: Case, schedule: list[int]) -> list[int]:
        tokens = case.tokens
        if any(schedule):  # the tower merged first
            tokens = expected_counts(tokens, case.prefix, [self.tower_r] * DEPTH)[-1]
        return expected_counts(tokens, case.prefix, schedule)

    def source(self, patch: Any) -> torch.Tensor | None:
        """The image token each tower token ends in (through both reductions)."""
        source = self.state(patch).source
        tower = patch.sites["vision"].last_state
        if source is None or tower.source is None:
            return source
        return source.gather(1, tower.source)


def heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, tokens, _ = t.shape
    return t.view(batch, tokens, -1, head_dim).transpose(1, 2)


def guided_oracle(case: Case, alpha: float) -> None:
    """The first cross-attention's output after the guided step, against float64 loops."""
    ops: GuidedOps = case.ops  # type: ignore[assignment]
    model = case.build().double()
    args = tuple(a.double() if a.is_floating_point() else a for a in case.inputs(2))
    first = case.blocks(model)[0]
    seen: dict[str, Any] = {}
    first.register_forward_pre_hook(
        lambda m, a, kw: seen.setdefault("input", (a, kw)), with_kwargs=True
    )
    first.register_forward_hook(lambda m, a, out: seen.setdefault("output", out))
    patch = ops.apply(model, case.r, alpha=alpha, semantic_scale=30.0)
    patch.configure(site=SITE, r=0)  # the step's input, the tower as it will run
    run(case, model, args)
    positional, kw = seen.pop("input")
    seen.pop("output")
    hidden = kw["hidden_states"] if "hidden_states" in kw else positional[0]
    image = kw["encoder_hidden_states"]
    tower = patch.sites["vision"].last_state.size
    size = torch.ones(*image.shape[:2], 1, dtype=image.dtype) if tower is None else tower

    inner = ops.cross(model)[0]
    width = inner.attention_head_size
    with torch.no_grad():
        q, k = heads(inner.query(hidden), width), heads(inner.key(image), width)
        logits = (q @ k.transpose(-1, -2)) * width**-0.5
        if ops.size_bias:
            logits = logits + size.log().transpose(1, 2).unsqueeze(1)
        probs = logits.softmax(-1).mean(1)  # (B, rows, image tokens)
        weight = ops.rows(args)
        weight = torch.ones(probs.shape[:2], dtype=probs.dtype) if weight is None else weight
        weight = weight.to(probs.dtype).unsqueeze(-1)
        if ops.pool == "mean":
            semantic = (probs * weight).sum(1) / weight.sum(1)
        else:
            semantic = probs.masked_fill(weight == 0, float("-inf")).amax(1)
        plans = oracle.oracle_plan(k.mean(1), semantic, case.r, case.prefix, weight=alpha * 30.0)
        assert all(plan[1] for plan in plans)  # something is reduced in every row
        rows = []
        for b, plan in enumerate(plans):
            if ops.reduce == "merge":
                rows.append(oracle.oracle_merge(image[b], size[b], plan))
            else:
                rows.append((image[b, plan[0]], size[b, plan[0]]))
        reduced = torch.stack([x for x, _ in rows])
        sizes = torch.stack([s for _, s in rows])
        mask = sizes.log().transpose(1, 2).unsqueeze(1) if ops.size_bias else None
        call = {**kw, "encoder_hidden_states": reduced, ops.mask: mask}
        call.pop("hidden_states", None)
        expected = type(first).forward(first, hidden, **call)

    patch.configure(site=SITE, r=case.r)
    run(case, model, args)
    got = seen["output"]
    first_of = (lambda out: out[0]) if isinstance(got, tuple) else (lambda out: out)
    assert ops.state(patch).r_applied == [case.r]
    assert ops.counts(patch) == [reduced.shape[1]]
    torch.testing.assert_close(first_of(got), first_of(expected), atol=1e-9, rtol=1e-9)


def run(case: Case, model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model, args)


def prune_cross_heads(inner: Any, output: Any) -> Any:
    """torch-pruning on the heads the ranking reads: one of four heads of every
    cross-attention over the image (query, key, value), nothing else.

    ``inner(model)``: those attentions' modules with ``query``/``key``/``value``;
    ``output``: the case's output (torch-pruning traces from it).
    """

    def prune(model: nn.Module, args: tuple[Any, ...]) -> None:
        import torch_pruning as tp

        attentions = inner(model)
        heads_of = {p: a.num_attention_heads for a in attentions for p in (a.query, a.key, a.value)}
        others = [
            m
            for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) and m not in heads_of
        ]
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        pruner = tp.pruner.MetaPruner(
            model, args, importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.25,
            num_heads=heads_of, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=0.25, ignored_layers=others, forward_fn=output,
        )  # fmt: skip
        pruner.step()
        for attention in attentions:  # what the library's reshapes read
            attention.num_attention_heads = pruner.num_heads[attention.query]
            attention.all_head_size = attention.num_attention_heads * attention.attention_head_size
            assert attention.query.out_features == 3 * attention.attention_head_size
        changed = {k for k, v in model.state_dict().items() if v.shape != shapes[k]}
        assert changed and all(
            k.rsplit(".", 2)[-2] in ("query", "key", "value", "dense") for k in changed
        ), changed

    return prune


# -------------------------------------------------------------------------- BLIP
def blip_first_cross(model: nn.Module) -> list[nn.Module]:
    return [model.text_encoder.encoder.layer[0].crossattention]


def blip_text(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Question / ITM text; row 1 padded, so the ranking must pool over real tokens."""
    ids = text(batch, length=16)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, 4:], mask[1, 4:] = PAD, 0
    return ids, mask


def blip_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    ids, mask = blip_text(batch)
    return ids, images(batch), mask


def blip_itm(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    ids, pixels, mask = args
    return model(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score


def blip_question(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    """What the VQA answer decoder cross-attends to: the question, after the image."""
    ids, pixels, mask = args
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    out = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image)
    return out.last_hidden_state


def blip_rows(args: tuple[Any, ...]) -> torch.Tensor:
    return args[2]


def blip_cross(model: nn.Module) -> list[nn.Module]:
    return [layer.crossattention.self for layer in model.text_encoder.encoder.layer]


# ----------------------------------------------------------- BLIP-2 / InstructBLIP
def qformer_first_cross(model: nn.Module) -> list[nn.Module]:
    return [model.qformer.encoder.layer[0].crossattention]


def blip2_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return images(batch), prompt(batch)


def blip2_itm(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return itm(model, *args)


def qformer_cross(model: nn.Module) -> list[nn.Module]:
    layers = model.qformer.encoder.layer
    return [layer.crossattention.attention for layer in layers if layer.has_cross_attention]


def instruct_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    return images(batch), prompt(batch), words(batch, seed=batch + 1)


def instruct_logits(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    pixels, ids, instruction = args
    return model(pixel_values=pixels, input_ids=ids, qformer_input_ids=instruction).logits


TOWER_FIRST = {
    "counts_follow_schedule": "the tower merges first here, so the kit's Target count "
    "(tokens - 1 after the step) lies above what reaches the step; the step's schedule "
    "forms run on the cases without tower merging",
    "roles_survive_settings": "the kit's reversed scorer reaches the tower too, whose "
    "reversed merges alone change the sources, so the check cannot tell whether the step "
    "kept the scorer; it runs on the cases without tower merging",
}

CASES = [
    Case(
        "hf-blip-itm-text-guided",
        lambda: build_blip("BlipForImageTextRetrieval"),
        blip_inputs,
        blip_itm,
        TOKENS,
        1,
        blip_first_cross,
        None,
        None,
        prune=prune_cross_heads(blip_cross, blip_itm),
        oracle=guided_oracle,
        ops=GuidedOps(blip, "text_encoder", blip_cross, "attention_mask", rows=blip_rows),
    ),
    Case(
        "hf-blip-vqa-text-guided-prune",
        lambda: build_blip("BlipForQuestionAnswering"),
        blip_inputs,
        blip_question,
        TOKENS,
        1,
        blip_first_cross,
        None,
        None,
        prune=prune_cross_heads(blip_cross, blip_question),
        oracle=guided_oracle,
        cannot={
            **TOWER_FIRST,
            "compile": "BlipForQuestionAnswering.forward returns no per-row output of its text "
            "encoder (a batch-mean loss only), so the case calls vision_model and text_encoder "
            "itself, which a torch.compile wrapper of the model never compiles; the text "
            "encoder's guided step compiles in hf-blip-itm-text-guided",
        },
        ops=GuidedOps(
            blip,
            "text_encoder",
            blip_cross,
            "attention_mask",
            tower_r=1,
            reduce="prune",
            pool="max",
            rows=blip_rows,
        ),
    ),
    Case(
        "hf-blip2-itm-qformer-guided",
        lambda: build_blip2("Blip2ForImageTextRetrieval"),
        blip2_inputs,
        blip2_itm,
        TOKENS,
        1,
        qformer_first_cross,
        None,
        None,
        prune=prune_cross_heads(qformer_cross, blip2_itm),
        oracle=guided_oracle,
        cannot={
            "cpu_offload": "Blip2TextEmbeddings moves input_ids to word_embeddings.weight's "
            "device outside that module's forward: under accelerate's cpu_offload that is the "
            "meta device, and the unpatched model fails",
        },
        ops=GuidedOps(blip2, "qformer", qformer_cross, "encoder_attention_mask"),
    ),
    Case(
        "hf-instructblip-qformer-guided-size-bias",
        lambda: build_blip2("InstructBlipForConditionalGeneration"),
        instruct_inputs,
        instruct_logits,
        TOKENS,
        1,
        qformer_first_cross,
        None,
        None,
        prune=prune_cross_heads(qformer_cross, instruct_logits),
        oracle=guided_oracle,
        cannot={
            **TOWER_FIRST,
            "compile": "CI budget (6 s): the Q-Former's guided step compiles in "
            "hf-blip2-itm-qformer-guided",
        },
        ops=GuidedOps(
            blip2, "qformer", qformer_cross, "encoder_attention_mask", tower_r=1, size_bias=True
        ),
    ),
]


@parametrize(CASES)
def test_conformance(case: Case, check: str) -> None:
    run_check(case, check)
