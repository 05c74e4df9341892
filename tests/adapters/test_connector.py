"""The connector stage: its budget rule, its prompt re-layout, and LLaVA-1.5 / Qwen2/2.5/3-VL
against hand-built oracles (the unpatched model fed the shortened prompt, the method's
tokens and, for Qwen, the full prompt's own M-RoPE positions at the kept columns)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from support import connector_methods as cm
from support import size_bias_oracle as sbo
from support import tiny_llava as tl
from support import tiny_prefix_vlms as tp
from support import tiny_qwen_vl as tq
from support.connector_cases import QWEN_GRIDS, llava_feed, qwen_feed

import turbo_adapters as ta
from turbo_adapters.connector import (
    ConnectorReduction,
    connector_counts,
    last_connector,
    shorten_runs,
)
from turbo_adapters.families.llava.llm import LLMReduction
from turbo_core.connector import (
    CONNECTOR_METHODS,
    ConnectorInputs,
    register_connector_method,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 4


# ------------------------------------------------------------------ budget
def test_counts_follow_the_budget_rule() -> None:
    assert connector_counts(64, [576, 30]) == [64, 30]
    assert connector_counts(0.25, [576, 10, 1]) == [144, 3, 1]
    assert connector_counts(1.0, [7]) == [7]
    assert connector_counts((5, 40), [10, 20]) == [5, 20]


@pytest.mark.parametrize(
    ("budget", "match"),
    [(0, "int >= 1"), (1.5, r"\(0, 1\]"), (0.0, r"\(0, 1\]"), (True, "budget"), ((1, 0), "ints >= 1"),
     ("64", "budget")],
)  # fmt: skip
def test_bad_budgets_name_the_parameter(budget, match) -> None:
    with pytest.raises(ValueError, match=match):
        ConnectorReduction(budget=budget)


def test_per_image_counts_must_match_the_images() -> None:
    with pytest.raises(ValueError, match="2 per-image counts but the call has 3 images"):
        connector_counts((1, 2), [4, 4, 4])


# ------------------------------------------------------------------ runs
def test_shorten_runs_keeps_the_chosen_placeholders_and_repads_left() -> None:
    img, pad = 9, 0
    ids = torch.tensor([[pad, 1, img, img, img, 2, img, img, 3], [4, img, img, img, 5, 6, 7, 8, 3]])
    mask = (ids != pad).long()
    kept = [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([2])]
    out = shorten_runs(ids, img, kept, [3, 2, 3], pad, mask, {"labels": ids.clone()})
    # a loop oracle: the rows as lists
    rows = [[1, img, img, 2, img, 3], [4, img, 5, 6, 7, 8, 3]]
    width = max(map(len, rows))
    want = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    assert torch.equal(out.input_ids, want)
    assert torch.equal(out.attention_mask, (want != pad).long())
    assert torch.equal(out.per_token["labels"], want.masked_fill(want == pad, -100))


def test_shorten_runs_refuses_placeholders_that_do_not_match() -> None:
    ids = torch.tensor([[1, 9, 9, 2]])
    with pytest.raises(ValueError, match="hold 2 image placeholders but the images have 3"):
        shorten_runs(ids, 9, [torch.tensor([0])], [3], 0)


# ------------------------------------------------------------------ LLaVA
def _llava_oracle(model, feed, k: int) -> dict:
    """The unpatched model's inputs for the reduced call, built by hand."""
    with torch.no_grad():
        output = model.model.get_image_features(pixel_values=feed["pixel_values"], return_dict=True)
    feats = torch.stack(list(output.pooler_output))
    reduced = cm.keep_strided(ConnectorInputs(feats), k)
    output = copy.copy(output)
    output.pooler_output = list(reduced.tokens)
    prompts = []
    for row in range(feed["input_ids"].shape[0]):
        ids = feed["input_ids"][row][feed["attention_mask"][row].bool()].tolist()
        short, run = [], 0
        for t in ids:
            run = run + 1 if t == tl.IMG else 0
            if t != tl.IMG or (run - 1) % tl.PER_IMAGE < k:
                short.append(t)
        prompts.append(short)
    ids, mask = tl.left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, "mm_encoder_outputs": {"image": output}}


def test_llava_connector_equals_the_unpatched_model_on_the_hand_built_prompt() -> None:
    model = tl.build()
    feed = llava_feed([0, 1, 2])
    oracle = _llava_oracle(model, feed, 9)
    with torch.no_grad():
        want_logits = model(**oracle).logits
        want = model.generate(**oracle, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    patch = ta.apply(model)
    # the layout alone; log(size) on the merged keys: test_*_size_bias_* below
    patch.connector = ConnectorReduction(budget=9, method=cm.STRIDED, size_bias=False)
    with torch.no_grad():
        got_logits = model(**feed, turbo_mode="connector").logits
        got = model.generate(
            **feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, turbo_mode="connector"
        )
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(
        got[:, feed["input_ids"].shape[1] :], want[:, oracle["input_ids"].shape[1] :]
    )
    assert torch.equal(got[:, : feed["input_ids"].shape[1]], feed["input_ids"])  # caller's prompt
    assert last_connector(patch).tokens_out == (9, 9, 9, 9)


def test_llava_guide_is_the_cls_attention_of_the_feature_layer() -> None:
    seen: list[ConnectorInputs] = []

    def record(inputs: ConnectorInputs, budget: int):
        seen.append(inputs)
        return cm.keep_first(inputs, budget)

    register_connector_method("test-record", record, replace=True)
    try:
        model = tl.build()
        feed = llava_feed([0, 1])
        patch = ta.apply(model)
        patch.connector = ConnectorReduction(budget=5, method="test-record")
        with torch.no_grad():
            model(**feed, turbo_mode="connector")
        model.model.vision_tower.set_attn_implementation("eager")
        with torch.no_grad():
            out = model.model.vision_tower(feed["pixel_values"], output_attentions=True)
        layer = model.config.vision_feature_layer  # -2: the output of layer N-2
        attn = out.attentions[len(out.attentions) + 1 + layer - 1]  # (B, H, N+1, N+1)
        want = attn[:, :, 0, 1:].mean(1)
        (inputs,) = seen
        torch.testing.assert_close(inputs.guide, want, atol=1e-5, rtol=1e-4)
        assert inputs.keys is not None and inputs.keys.shape[:2] == want.shape
        # the instruction: each image's row's text tokens, embedded
        row0 = feed["input_ids"][0][feed["attention_mask"][0].bool()]
        text0 = model.get_input_embeddings()(row0[row0 != tl.IMG])
        torch.testing.assert_close(inputs.text[0, : text0.shape[0]], text0)
        assert int(inputs.text_mask[0].sum()) == text0.shape[0]
    finally:
        CONNECTOR_METHODS.pop("test-record", None)


def test_llava_tower_then_connector_counts() -> None:
    model = tl.build()
    feed = llava_feed([0, 2])
    patch = ta.apply(model, r=4)
    patch.connector = ConnectorReduction(budget=0.5, method=cm.STRIDED)
    with torch.no_grad():
        model(**feed, turbo_mode={"tower", "connector"})
    merged = patch.last_state.token_counts[-1] - 1  # CLS dropped
    assert last_connector(patch).tokens_in == (merged, merged)
    assert last_connector(patch).tokens_out == tuple(connector_counts(0.5, [merged, merged]))


def test_connector_errors_are_clear() -> None:
    model = tl.build()
    feed = llava_feed([0])
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=4, method="no-such-method")
    with pytest.raises(ValueError, match="unknown connector method 'no-such-method'"):
        model(**feed, turbo_mode="connector")
    patch.connector = ConnectorReduction(budget=4, method=cm.FIRST)
    embeds = model.get_input_embeddings()(feed["input_ids"])
    with pytest.raises(ValueError, match="connector mode needs input_ids"):
        model(inputs_embeds=embeds, pixel_values=feed["pixel_values"], turbo_mode="connector")
    with pytest.raises(ValueError, match="turbo mode must be"):
        model(**feed, turbo_mode="connecter")


# ------------------------------------------------------------------ Qwen
def _qwen_oracle(model, feed, k: int) -> tuple[dict, torch.Tensor]:
    """The unpatched model's inputs for the reduced call: hand-shortened prompt, the
    method's tokens, deepstack cut at the kept indices, and the FULL prompt's M-RoPE
    positions at the kept columns."""
    inner = model.model
    with torch.no_grad():
        output = inner.get_image_features(
            feed["pixel_values"], feed["image_grid_thw"], return_dict=True
        )
        full, _ = inner.get_rope_index(
            feed["input_ids"], feed["mm_token_type_ids"], image_grid_thw=feed["image_grid_thw"],
            attention_mask=feed["attention_mask"],
        )  # fmt: skip
    tokens, index = [], []
    for f in output.pooler_output:
        r = cm.keep_strided(ConnectorInputs(f[None]), k)
        tokens.append(r.tokens[0])
        index.append(r.index[0])
    output = copy.copy(output)
    output.pooler_output = tuple(tokens)
    if getattr(output, "deepstack_features", None) is not None:
        output.deepstack_features = [
            tuple(f[i] for f, i in zip(level, index, strict=True))
            for level in output.deepstack_features
        ]
    sizes = [
        f.shape[0]
        for f in inner.get_image_features(
            feed["pixel_values"], feed["image_grid_thw"]
        ).pooler_output
    ]
    prompts, columns, image = [], [], 0
    for row in range(feed["input_ids"].shape[0]):
        cols = feed["attention_mask"][row].nonzero().squeeze(-1).tolist()
        keep, run = [], 0
        for c in cols:
            if int(feed["input_ids"][row, c]) == tq.IMG:
                if run == 0:
                    kept = set(index[image].tolist())
                if run in kept:
                    keep.append(c)
                run += 1
                if run == sizes[image]:
                    run, image = 0, image + 1
            else:
                keep.append(c)
        prompts.append(feed["input_ids"][row, keep].tolist())
        columns.append(keep)
    ids, mask = tl.left_pad(prompts)
    positions = torch.zeros(3, *ids.shape, dtype=torch.long)
    for row, keep in enumerate(columns):
        positions[:, row, ids.shape[1] - len(keep) :] = full[:, row, keep]
    oracle = {
        "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == tq.IMG).long(),
        "mm_encoder_outputs": {"image": output}, "position_ids": positions,
    }  # fmt: skip
    return oracle, positions


def _qwen_greedy(model, oracle: dict, positions: torch.Tensor) -> torch.Tensor:
    """Greedy decoding by full recomputation (no cache): new tokens take the positions
    after each row's highest prompt position, one by one."""
    ids, mask = oracle["input_ids"], oracle["attention_mask"]
    nxt = positions.amax(dim=(0, 2)) + 1  # (B,)
    out = []
    for step in range(NEW):
        feed = {**oracle, "input_ids": ids, "attention_mask": mask, "position_ids": positions,
                "mm_token_type_ids": (ids == tq.IMG).long()}  # fmt: skip
        with torch.no_grad():
            token = model(**feed).logits[:, -1].argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        new = (nxt + step).view(1, -1, 1).expand(3, -1, 1)
        positions = torch.cat([positions, new], 2)
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", tq.KINDS)
def test_qwen_connector_equals_the_unpatched_model_with_kept_positions(kind) -> None:
    model = tq.build(kind)
    rows = [0, 1, 2]
    feed = qwen_feed(rows)
    oracle, positions = _qwen_oracle(model, feed, 3)
    with torch.no_grad():
        want_logits = model(**oracle).logits
    want = _qwen_greedy(model, oracle, positions)
    patch = ta.apply(model)
    assert patch.modes == frozenset({"connector"})
    patch.connector = ConnectorReduction(budget=3, method=cm.STRIDED, size_bias=False)
    with torch.no_grad():
        got_logits = model(**feed).logits
        got = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    valid = oracle["attention_mask"].bool()
    torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, feed["input_ids"].shape[1] :], want)
    tokens = [tq.tokens(g) for r in rows for g in QWEN_GRIDS[r]]
    assert last_connector(patch).tokens_out == tuple(connector_counts(3, tokens))
    assert min(tokens) < 3 < max(tokens)  # an image smaller than the budget keeps all


def test_qwen3_tower_mode_is_refused_with_the_reason() -> None:
    patch = ta.apply(tq.build("qwen3_vl"))
    with pytest.raises(ValueError, match="deepstack"):
        patch.modes = "tower"


def test_qwen3_llm_mode_needs_k_at_or_after_the_deepstack() -> None:
    model = tq.build("qwen3_vl", layers=4)
    patch = ta.apply(model)
    patch.llm = LLMReduction(layer=1, keep=0.5)
    with pytest.raises(ValueError, match="llm layer must be >= 2 on Qwen3-VL"):
        model(**qwen_feed([0]), turbo_mode="llm")


@pytest.mark.parametrize("kind", tq.KINDS)
def test_qwen_llm_mode_keeping_all_equals_unpatched(kind) -> None:
    model = tq.build(kind, layers=4)
    feed = qwen_feed([0, 1])
    with torch.no_grad():
        ref = model(**feed).logits[:, -1]
    patch = ta.apply(model)
    patch.llm = LLMReduction(layer=2, keep=1.0)
    with torch.no_grad():
        got = model(**feed, turbo_mode="llm").logits[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    patch.llm = LLMReduction(layer=2, keep=0.5)
    with torch.no_grad():
        out = model.generate(**feed, max_new_tokens=NEW, do_sample=False, turbo_mode="llm")
    assert out.shape[1] == feed["input_ids"].shape[1] + NEW


@pytest.mark.parametrize(
    ("name", "kind"),
    [("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl"), ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
     ("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl")],
)  # fmt: skip
def test_qwen_names_and_types_resolve(name, kind) -> None:
    assert ta.get_adapter(name).name == "qwen-vl"
    assert ta.get_adapter(kind).name == "qwen-vl"
    assert ta.adapter_for_model(tq.build(kind, layers=1)).name == "qwen-vl"


# ------------------------------------------------------------------ PaliGemma, Gemma 3
def _prefix_oracle(model, feed, n: int, k: int, image: int) -> dict:
    """Hand-shortened prompt (each run of ``n`` placeholders keeps the strided ``k``),
    token types alike, and the method applied to the unpatched model's image features."""
    with torch.no_grad():
        output = model.model.get_image_features(feed["pixel_values"], return_dict=True)
    reduced = cm.keep_strided(ConnectorInputs(output.pooler_output), k)
    output = copy.copy(output)
    output.pooler_output = reduced.tokens.reshape(1, -1, reduced.tokens.shape[-1])
    keep = set(cm.strided_index(n, k))
    prompts, types = [], []
    for row in range(feed["input_ids"].shape[0]):
        valid = feed["attention_mask"][row].bool()
        ids = feed["input_ids"][row][valid].tolist()
        types_in = feed.get("token_type_ids", torch.zeros_like(feed["input_ids"]))
        kinds = types_in[row][valid].tolist()
        short, short_types, run = [], [], 0
        for t, kind in zip(ids, kinds, strict=True):
            if t == image:
                if run % n in keep:
                    short.append(t)
                    short_types.append(kind)
                run += 1
            else:
                short.append(t)
                short_types.append(kind)
        prompts.append(short)
        types.append(short_types)
    ids, mask = tl.left_pad(prompts)
    token_types = torch.zeros_like(ids)
    for row, t in enumerate(types):
        token_types[row, ids.shape[1] - len(t) :] = torch.tensor(t)
    oracle = {"input_ids": ids, "attention_mask": mask, "mm_encoder_outputs": {"image": output}}
    if "token_type_ids" in feed:
        oracle["token_type_ids"] = token_types
    return oracle


@pytest.mark.parametrize(
    ("build", "feed_of", "n"),
    [(tp.build_paligemma, tp.paligemma_feed, 64), (tp.build_gemma3, tp.gemma3_feed, 16),
     (tp.build_internvl, tp.internvl_feed, 16)],
    ids=["paligemma", "gemma3", "internvl"],
)  # fmt: skip
def test_prefix_families_equal_the_unpatched_model_on_the_hand_built_prompt(
    build, feed_of, n
) -> None:
    model = build()
    feed = feed_of([0, 1, 2])
    oracle = _prefix_oracle(model, feed, n, 5, tp.IMG)
    with torch.no_grad():
        want_logits = model(**oracle).logits
        want = model.generate(**oracle, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    patch = ta.apply(model)
    assert patch.modes == frozenset({"connector"})
    # the layout alone; log(size) on the merged keys: test_connector_size_bias.py
    patch.connector = ConnectorReduction(budget=5, method=cm.STRIDED, size_bias=False)
    with torch.no_grad():
        got_logits = model(**feed).logits
        got = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    valid = oracle["attention_mask"].bool()
    torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(
        got[:, feed["input_ids"].shape[1] :], want[:, oracle["input_ids"].shape[1] :]
    )
    if "InternVL" not in type(model).__name__:  # InternVL merges in its tower: test_internvl_tower
        with pytest.raises(ValueError, match="tower mode is not available"):
            patch.modes = "tower"
    if "Gemma" in type(model).__name__:
        with pytest.raises(Exception, match="bidirectionally"):
            patch.modes = "llm"


@pytest.mark.parametrize(
    ("name", "adapter"),
    [("google/paligemma-3b-mix-224", "paligemma"), ("google/gemma-3-4b-it", "gemma3"),
     ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-onevision"), ("gemma3", "gemma3"),
     ("paligemma", "paligemma"), ("llava_onevision", "llava-onevision"),
     ("HuggingFaceTB/SmolVLM-Instruct", "idefics3"), ("smolvlm", "idefics3"),
     ("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3"), ("OpenGVLab/InternVL3-1B-hf", "internvl"),
     ("internvl", "internvl")],
)  # fmt: skip
def test_prefix_family_names_resolve(name, adapter) -> None:
    assert ta.get_adapter(name).name == adapter


@pytest.mark.parametrize(
    ("build", "feed_of"),
    [(tp.build_onevision, tp.onevision_feed), (tp.build_idefics3, tp.idefics3_feed),
     (tp.build_internvl, tp.internvl_feed)],
    ids=["llava-onevision", "idefics3", "internvl"],
)  # fmt: skip
def test_llm_mode_keeping_all_equals_unpatched(build, feed_of) -> None:
    model = build()
    feed = feed_of([0, 1])
    with torch.no_grad():
        ref = model(**feed).logits[:, -1]
    patch = ta.apply(model)
    patch.llm = LLMReduction(layer=1, keep=1.0)
    with torch.no_grad():
        got = model(**feed, turbo_mode="llm").logits[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ log(size) in the LLM


def test_llava_size_bias_equals_the_unpatched_model_with_an_explicit_bias() -> None:
    model = tl.build()
    feed = llava_feed([0, 1, 2])
    oracle = _llava_oracle(model, feed, 9)
    sizes = sbo.strided_sizes([tl.PER_IMAGE] * 4, 9)
    assert max(sizes) > 1
    bias_mask = sbo.bias_mask(
        oracle["attention_mask"], sbo.key_logs(oracle["input_ids"], tl.IMG, sizes)
    )
    with torch.no_grad():
        want_logits = model(**{**oracle, "attention_mask": bias_mask}).logits
        plain = model(**oracle).logits
    want = sbo.greedy_with_bias(model, oracle, sizes, tl.IMG, NEW)
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=9, method=cm.STRIDED)  # size_bias: default
    with torch.no_grad():
        got_logits = model(**feed, turbo_mode="connector").logits
        got = model.generate(
            **feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, turbo_mode="connector"
        )
    valid = oracle["attention_mask"].bool()
    torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[valid], want_logits[valid], atol=1e-3)  # the bias matters
    assert torch.equal(got[:, feed["input_ids"].shape[1] :], want)


@pytest.mark.parametrize("kind", tq.KINDS)
def test_qwen_size_bias_equals_the_unpatched_model_with_an_explicit_bias(kind) -> None:
    model = tq.build(kind)
    rows = [0, 1, 2]
    feed = qwen_feed(rows)
    oracle, _ = _qwen_oracle(model, feed, 3)
    tokens = [tq.tokens(g) for r in rows for g in QWEN_GRIDS[r]]
    sizes = sbo.strided_sizes(tokens, 3)
    assert max(sizes) > 1
    bias_mask = sbo.bias_mask(
        oracle["attention_mask"], sbo.key_logs(oracle["input_ids"], tq.IMG, sizes)
    )
    with torch.no_grad():
        want_logits = model(**{**oracle, "attention_mask": bias_mask}).logits
    want = sbo.greedy_with_bias(model, oracle, sizes, tq.IMG, NEW)
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=3, method=cm.STRIDED)
    with torch.no_grad():
        got_logits = model(**feed).logits
        got = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    valid = oracle["attention_mask"].bool()
    torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, feed["input_ids"].shape[1] :], want)


def test_size_bias_required_where_the_decoder_lacks_it_is_an_error_with_the_reason() -> None:
    model = tp.build_paligemma()
    # a decoder on flex attention takes no 4-D additive mask (the call refuses before it runs)
    model.model.language_model.config._attn_implementation = "flex_attention"
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=5, method=cm.STRIDED, size_bias=True)
    with (
        pytest.raises(
            ValueError, match=r"size_bias=True: paligemma does not carry .*'flex_attention'"
        ),
        torch.no_grad(),
    ):
        model(**tp.paligemma_feed([0]))
    with pytest.raises(ValueError, match="size_bias must be None, True or False"):
        ConnectorReduction(size_bias="yes")  # type: ignore[arg-type]
