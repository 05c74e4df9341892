"""turbo-eval's vision-language tasks (caption, vqa, vl-retrieval) on tiny real models.

Models are the real transformers classes (and MiniGPT-v2 from turbo-adapters) built
from the named checkpoints' configs shrunk with the ``config`` model option, random
weights. Data: the packaged photos with their written captions, easy-VQA, and files
written here. Oracles: the unpatched model (r = 0 cells equal the baseline), the
library's own ITM forward (for the retrieval session), answers files made from the
unpatched model's own answers (accuracy 1), the model saved and loaded back.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

from turbo_eval.methods import apply_method, method_overrides  # noqa: E402
from turbo_eval.models import load_model  # noqa: E402
from turbo_eval.suite import SuiteError, parse_suite  # noqa: E402
from turbo_eval.tasks import TASK_KINDS  # noqa: E402
from turbo_eval.vl import VLModel, VLSample  # noqa: E402

CAPTION = "Salesforce/blip-image-captioning-base"
VQA = "Salesforce/blip-vqa-base"
ITM = "Salesforce/blip-itm-base-coco"
BLIP2 = "Salesforce/blip2-opt-2.7b"
BLIP2_ITM = "Salesforce/blip2-itm-vit-g"
INSTRUCTBLIP = "Salesforce/instructblip-vicuna-7b"
LLAVA = "llava-hf/llava-1.5-7b-hf"
MINIGPT = "minigpt-v2"

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8,
)  # fmt: skip
BLIP = {
    "vision_config": VISION,
    "text_config": dict(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
        bos_token_id=1, sep_token_id=2, eos_token_id=2, pad_token_id=0,
    ),
}  # fmt: skip
QFORMER = dict(
    vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64,
    cross_attention_frequency=1,
)  # fmt: skip
TINY: dict[str, dict[str, Any]] = {
    CAPTION: BLIP,
    VQA: BLIP,
    ITM: BLIP,
    BLIP2: {
        "vision_config": {**VISION, "qkv_bias": True},
        "qformer_config": QFORMER,
        "num_query_tokens": 4,
        "image_token_index": 399,
        "text_config": dict(
            vocab_size=400,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        ),
    },
    BLIP2_ITM: {
        "vision_config": {**VISION, "qkv_bias": True},
        "qformer_config": QFORMER,
        "num_query_tokens": 4,
        "image_text_hidden_size": 16,
    },
    INSTRUCTBLIP: {
        "vision_config": {**VISION, "qkv_bias": True},
        "qformer_config": QFORMER,
        "num_query_tokens": 4,
        "image_token_index": 399,
        "text_config": dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=400,
            pad_token_id=0,
            max_position_embeddings=128,
        ),
    },
    LLAVA: {
        "vision_config": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=4,
        ),
        "text_config": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=400,
            pad_token_id=0,
        ),
        "image_token_id": 399,
        "pad_token_id": 0,
        "image_seq_length": 64,
    },
    MINIGPT: {
        "image_size": 56,
        "patch_size": 7,
        "vision_width": 32,
        "vision_depth": 3,
        "vision_heads": 4,
        "vision_mlp_ratio": 2.0,
        "lora_r": 4,
        "lora_alpha": 8,
        "llama": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=400,
            pad_token_id=0,
        ),
    },
}
#: BLIP-2 with a T5 language model (encoder-decoder): a variant of the OPT entry
BLIP2_T5 = "blip2-t5"
T5 = dict(
    model_type="t5", vocab_size=400, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, bos_token_id=None,
)  # fmt: skip
#: tokens merged per block: enough to change outputs of each tiny tower
R = {CAPTION: 4, VQA: 4, ITM: 4, BLIP2: 4, BLIP2_T5: 4, BLIP2_ITM: 4, LLAVA: 12, MINIGPT: 8}
R[INSTRUCTBLIP] = 4
SUITE = parse_suite('[[models]]\nname = "x"\n[[tasks]]\nkind = "fidelity"\nmodel = "x"\n', "s")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str, **options: Any) -> VLModel:
    if name == BLIP2_T5:
        return tiny(BLIP2, config={**TINY[BLIP2], "text_config": T5}, **options)
    if name == MINIGPT:
        pytest.importorskip("peft")
        pytest.importorskip("timm")
    model = load_model(name, None, {"weights": "random", "config": TINY[name], **options})
    assert isinstance(model, VLModel)
    return model


def make_task(kind: str, model: VLModel, **options: Any) -> Any:
    problems = TASK_KINDS[kind].validate(options)
    assert not problems, problems
    task = TASK_KINDS[kind](options, model, seed=0, batch_size=3)
    task.facts = task.prepare(lambda it, _: it)
    return task


def run_cell(task: Any, model: VLModel, method: str, r: int) -> tuple[dict[str, Any], Any, Any]:
    apply_method(model, method_overrides(method, r, SUITE))
    metrics = dict(task.evaluate(lambda it, _: it))
    items = metrics.pop("items")
    for column in items.values():
        assert len(column) == len(items[task.item_score])
    assert np.mean(items[task.item_score]) == pytest.approx(metrics[task.metric])
    state = model.handle.last_state if model.handle is not None else None
    return metrics, items, state


def photos_available() -> None:
    pytest.importorskip("skimage")


# ----------------------------------------------------------------------- caption
@pytest.mark.parametrize("name", [CAPTION, BLIP2, BLIP2_T5, INSTRUCTBLIP, LLAVA, MINIGPT])
def test_caption_r0_is_the_baseline_and_r_positive_differs(name: str) -> None:
    photos_available()
    pytest.importorskip("pycocoevalcap")
    model = tiny(name)
    task = make_task("caption", model, images=4, max_new_tokens=6)
    assert task.facts["weights"] == "random" and task.facts["references"]
    assert task.metric == "token_agreement"  # random weights: fidelity is the headline
    assert task.facts["distinct_reference_captions"] > 1  # the captions depend on the image
    base, items, _ = run_cell(task, model, "baseline", 0)
    assert (base["token_agreement"], base["caption_kl"], base["caption_match"]) == (1, 0, 1)
    assert len(items["cider"]) == 4 and "bleu4" in base
    zero, _, state = run_cell(task, model, "turbo", 0)
    assert zero["token_agreement"] == 1 and zero["caption_match"] == 1
    assert zero["caption_kl"] < 1e-6 and state is not None
    merged, _, state = run_cell(task, model, "turbo", R[name])
    assert state.token_counts[-1] < state.token_counts[0]
    assert merged["caption_kl"] > 1e-6
    model.set_method(None)


@pytest.mark.parametrize("name", [VQA, BLIP2, BLIP2_T5, INSTRUCTBLIP, LLAVA, MINIGPT])
def test_vqa_on_easy_vqa_r0_is_the_baseline_and_r_positive_differs(name: str) -> None:
    pytest.importorskip("easy_vqa")
    model = tiny(name)
    task = make_task("vqa", model, limit=6, max_new_tokens=3)
    assert task.facts["dataset"] == "easy-vqa" and task.facts["answers"]
    assert task.metric == "answer_match"
    base, items, _ = run_cell(task, model, "baseline", 0)
    assert base["answer_match"] == 1 and base["first_token_kl"] == 0
    assert all(0 <= a <= 1 for a in items["accuracy"])
    zero, _, _ = run_cell(task, model, "turbo", 0)
    assert zero["answer_match"] == 1 and zero["first_token_kl"] < 1e-6
    merged, _, state = run_cell(task, model, "turbo", R[name])
    assert state.token_counts[-1] < state.token_counts[0]
    assert merged["first_token_kl"] > 1e-7
    model.set_method(None)


def test_llava_llm_mode_from_model_options() -> None:
    pytest.importorskip("easy_vqa")
    model = tiny(LLAVA, llava_mode="llm", llm_layer=1, llm_keep=0.25)
    task = make_task("vqa", model, limit=3, max_new_tokens=2)
    merged, _, _ = run_cell(task, model, "turbo", 0)  # the tower unchanged, the LLM prunes
    assert model.handle.modes == {"llm"} and model.handle.llm.keep == 0.25
    assert merged["first_token_kl"] > 1e-7
    model.set_method(None)


def test_scaled_init_draws_the_documented_scales() -> None:
    model = tiny(
        CAPTION, config={**BLIP, "text_config": {**BLIP["text_config"], "hidden_size": 256}}
    )
    layers = model.module.text_decoder.bert.encoder.layer  # 2 post-norm layers, width 256
    attention = layers[0].attention
    for weight, expected in (
        (attention.self.query.weight, 2 / 256**0.5),  # query/key gain 2
        (attention.self.value.weight, 1 / 256**0.5),
        (attention.output.dense.weight, 1 / 256**0.5 / 2),  # 1/sqrt(2 x 2 layers)
        (layers[1].output.dense.weight, 1 / 64**0.5 / 2),  # the MLP out, fan-in 64
    ):
        assert float(weight.std()) == pytest.approx(expected, rel=0.05)
    qkv = model.module.vision_model.encoder.layers[0].self_attn.qkv.weight  # fused: q, k, v
    assert float(qkv[:32].std()) == pytest.approx(2 * float(qkv[64:].std()), rel=0.25)


# --------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("name", [ITM, BLIP2_ITM])
def test_retrieval_r0_is_the_baseline_and_r_positive_differs(name: str) -> None:
    photos_available()
    model = tiny(name)
    task = make_task("vl-retrieval", model, images=5)
    assert task.metric == "itm_spearman" and task.facts["texts"] == 5
    base, _, _ = run_cell(task, model, "baseline", 0)
    assert base["itm_spearman"] == 1 and base["itm_top1_agreement"] == 1
    zero, _, _ = run_cell(task, model, "turbo", 0)
    assert zero["itm_spearman"] == pytest.approx(1) and zero["itm_top1_agreement"] == 1
    merged, items, state = run_cell(task, model, "turbo", R[name])
    assert state.token_counts[-1] < state.token_counts[0]
    assert {"itm_spearman", "itc_spearman", "t2i_r1", "t2i_rank"} <= set(items)
    assert all(-1 <= s <= 1 for s in items["itm_spearman"])
    assert {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= set(merged)
    model.set_method(None)


def test_blip_retrieval_session_equals_the_library_forward() -> None:
    photos_available()
    from turbo_eval.vl_data import packaged_captioned_photos

    model = tiny(ITM)
    found = packaged_captioned_photos(3)
    images, texts = [c.image for c in found], [c.captions[0] for c in found]
    session = model.retrieval(images, texts, batch_size=2)
    inputs = model.head.inputs(images, texts, "caption")  # pairs (image i, text i)
    with torch.no_grad():
        itm = model.module(**inputs, use_itm_head=True).itm_score.softmax(-1)[:, 1]
        itc = model.module(**inputs, use_itm_head=False).itm_score  # (images, texts)
    torch.testing.assert_close(session.itm_matrix().diagonal(), itm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(session.itc(), itc, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- local checkpoints
@pytest.mark.parametrize("name", [CAPTION, LLAVA])
def test_local_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    model = tiny(name)
    folder = tmp_path / "checkpoint"
    model.module.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    model.head.pixels.processor.save_pretrained(folder)
    loaded = load_model(str(folder))
    assert isinstance(loaded, VLModel) and loaded.weights == "pretrained"
    assert type(loaded.module) is type(model.module) and loaded.family == model.family
    rng = np.random.default_rng(0)
    samples = [VLSample(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "a dog") for _ in "ab"]
    purpose = "caption"
    ours, theirs = model.generate(samples, purpose, 5), loaded.generate(samples, purpose, 5)
    assert torch.equal(ours.tokens, theirs.tokens)
    torch.testing.assert_close(ours.first_logits, theirs.first_logits)
    torch.testing.assert_close(
        model.teacher_forced(samples, purpose, ours.tokens),
        loaded.teacher_forced(samples, purpose, ours.tokens),
    )


def test_instructblip_checkpoint_loads_with_its_processor(tmp_path: Path) -> None:
    model = tiny(INSTRUCTBLIP)
    head = model.head
    processor = transformers.InstructBlipProcessor(
        head.pixels.processor, model.tokenizer, head.qformer_tokenizer, num_query_tokens=4
    )
    model.module.save_pretrained(tmp_path / "bare")
    model.tokenizer.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"no Q-Former tokenizer .* qformer_tokenizer"):
        load_model(str(tmp_path / "bare"))
    folder = tmp_path / "checkpoint"
    model.module.save_pretrained(folder)
    processor.save_pretrained(folder)  # tokenizer, qformer_tokenizer/, image processor
    loaded = load_model(str(folder))
    assert isinstance(loaded, VLModel) and loaded.weights == "pretrained"
    assert type(loaded.module).__name__ == "InstructBlipForConditionalGeneration"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    # one question: the head lays out what the library's processor does
    ours = loaded.inputs([VLSample(image, "what color is the shape")], "vqa")
    theirs = processor(
        images=[image], text=["Question: what color is the shape Short answer:"],
        return_tensors="pt",
    )  # fmt: skip
    for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])
    samples = [VLSample(image, "what color is the shape"), VLSample(image[::-1], "is it red")]
    first, second = model.generate(samples, "vqa", 4), loaded.generate(samples, "vqa", 4)
    assert torch.equal(first.tokens, second.tokens)
    torch.testing.assert_close(first.first_logits, second.first_logits)


def test_pretrained_weights_make_the_reference_metric_the_headline(tmp_path: Path) -> None:
    photos_available()
    pytest.importorskip("pycocoevalcap")
    model = tiny(CAPTION)
    model.module.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))  # no image processor saved: built from the config
    task = make_task("caption", loaded, images=3, max_new_tokens=4)
    assert task.metric == task.item_score == "cider"
    metrics, items, _ = run_cell(task, loaded, "baseline", 0)
    assert metrics["cider"] == pytest.approx(np.mean(items["cider"]))
    fidelity = make_task("caption", loaded, images=3, max_new_tokens=4, headline="fidelity")
    assert fidelity.metric == "token_agreement"


def test_loader_errors_name_what_is_missing(tmp_path: Path) -> None:
    model = tiny(CAPTION)
    model.module.save_pretrained(tmp_path)  # weights and config, no tokenizer
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match='weights = "random"'):
        load_model(CAPTION, None, {"weights": "pretrained"})
    with pytest.raises(ValueError, match="weights"):
        load_model(CAPTION, None, {"weights": "maybe"})
    with pytest.raises(ValueError, match="llm_keep"):
        load_model(LLAVA, None, {"weights": "random", "llm_keep": 2.0})
    with pytest.raises(ValueError, match="resolution"):
        load_model(CAPTION, 64, {"weights": "random", "config": BLIP})
    with pytest.raises(TypeError, match="prune side supports image models"):
        model.set_method({"r": 2, "model_side": "prune"})


# ------------------------------------------------------------------ data loaders
def write_photos(folder: Path, count: int) -> list[tuple[str, tuple[str, ...]]]:
    """Packaged photos as JPEG files, with their written captions."""
    from PIL import Image

    from turbo_eval.vl_data import packaged_captioned_photos

    out = []
    for n, photo in enumerate(packaged_captioned_photos(count)):
        name = f"COCO_val2014_{n + 1:012d}.jpg"
        Image.fromarray(photo.image).resize((48, 40)).save(folder / name)
        out.append((name, photo.captions))
    return out


def test_caption_annotation_loaders(tmp_path: Path) -> None:
    photos_available()
    from turbo_eval.vl_data import load_caption_annotations

    (tmp_path / "val2014").mkdir()
    files = write_photos(tmp_path / "val2014", 4)
    karpathy = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": name,
                "cocoid": n,
                "split": "test" if n < 3 else "val",
                "sentences": [{"raw": c} for c in captions],
            }
            for n, (name, captions) in enumerate(files)
        ],
    }
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    test = load_caption_annotations(tmp_path / "karpathy.json", tmp_path)
    assert [c.key for c in test] == ["0", "1", "2"]
    assert test[1].captions == files[1][1] and test[1].image == tmp_path / "val2014" / files[1][0]
    assert len(load_caption_annotations(tmp_path / "karpathy.json", tmp_path, "val")) == 1
    assert len(load_caption_annotations(tmp_path / "karpathy.json", tmp_path, limit=2)) == 2
    lavis = [{"image": f"val2014/{name}", "caption": list(caps)} for name, caps in files]
    (tmp_path / "lavis.json").write_text(json.dumps(lavis))
    assert [c.captions for c in load_caption_annotations(tmp_path / "lavis.json", tmp_path)] == [
        caps for _, caps in files
    ]
    (tmp_path / "val2014" / files[0][0]).unlink()
    with pytest.raises(FileNotFoundError, match=files[0][0]):
        load_caption_annotations(tmp_path / "karpathy.json", tmp_path)
    (tmp_path / "odd.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="Karpathy"):
        load_caption_annotations(tmp_path / "odd.json", tmp_path)


def test_caption_task_on_a_karpathy_file(tmp_path: Path) -> None:
    photos_available()
    pytest.importorskip("pycocoevalcap")
    files = write_photos(tmp_path, 3)
    images = [
        {"filename": name, "imgid": n, "split": "test", "sentences": [{"raw": c} for c in caps]}
        for n, (name, caps) in enumerate(files)
    ]
    (tmp_path / "flickr.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    model = tiny(CAPTION)
    task = make_task(
        "caption", model, annotations=str(tmp_path / "flickr.json"), image_root=str(tmp_path),
        headline="reference", max_new_tokens=4,
    )  # fmt: skip
    assert task.facts["dataset"] == "annotations" and task.metric == "cider"
    metrics, items, _ = run_cell(task, model, "turbo", 4)
    assert {"bleu4", "cider", "token_agreement"} <= set(metrics) and len(items["cider"]) == 3


def test_vqa_accuracy_is_one_for_the_unpatched_models_own_answers(tmp_path: Path) -> None:
    photos_available()
    from turbo_eval.vl_data import load_vqa_samples
    from turbo_eval.vl_metrics import normalize_answer

    files = write_photos(tmp_path, 3)
    questions = ["what is in the picture?", "what color is it?", "is it outside?"]
    model = tiny(VQA)
    samples = [VLSample(tmp_path / name, q) for (name, _), q in zip(files, questions, strict=True)]
    # written as VQAv2's annotations are: already normalised (the official rules compare
    # unanimous human answers as given)
    answers = [normalize_answer(a) for a in model.decode(model.generate(samples, "vqa", 3).tokens)]
    (tmp_path / "q.json").write_text(
        json.dumps(
            {
                "questions": [
                    {"question_id": 10 + n, "image_id": n + 1, "question": q}
                    for n, q in enumerate(questions)
                ]
            }
        )
    )
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {"question_id": 10 + n, "answers": [{"answer": a}] * 10}
                    for n, a in enumerate(answers)
                ]
            }
        )
    )
    paths = {"questions": str(tmp_path / "q.json"), "annotations": str(tmp_path / "a.json")}
    paths["images"] = str(tmp_path)
    loaded = load_vqa_samples("vqav2", paths, limit=10)
    assert [s.text for s in loaded] == questions and loaded[0].answers == (answers[0],) * 10
    task = make_task("vqa", model, dataset="vqav2", headline="reference", max_new_tokens=3, **paths)
    assert task.metric == "accuracy"
    metrics, items, _ = run_cell(task, model, "baseline", 0)
    assert metrics["accuracy"] == 1 and items["accuracy"] == [1.0] * 3
    gqa = {str(n): {"imageId": Path(name).stem, "question": q, "answer": a}
           for n, ((name, _), q, a) in enumerate(zip(files, questions, answers, strict=True))}  # fmt: skip
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    task = make_task(
        "vqa", model, dataset="gqa", questions=str(tmp_path / "gqa.json"),
        images=str(tmp_path), headline="reference", max_new_tokens=3,
    )  # fmt: skip
    assert run_cell(task, model, "baseline", 0)[0]["accuracy"] == 1
    with pytest.raises(FileNotFoundError, match="images"):
        load_vqa_samples("vizwiz", {"annotations": str(tmp_path / "a.json"), "images": "/no"}, 3)


# ------------------------------------------------------------ options validation
@pytest.mark.parametrize(
    ("kind", "options", "key"),
    [
        ("caption", 'headline = "best"', "headline"),
        ("caption", "max_new_tokens = 0", "max_new_tokens"),
        ("caption", 'annotations = "a.json"', "image_root"),
        ("caption", "prompt = 3", "prompt"),
        ("vqa", 'dataset = "coco"', "dataset"),
        ("vqa", 'dataset = "vqav2"\nimages = "x"\nannotations = "y"', "questions"),
        ("vl-retrieval", "images = 2", "images"),
        ("vl-retrieval", "colour = 1", "colour"),
    ],
)
def test_task_option_errors_name_the_option(kind: str, options: str, key: str) -> None:
    text = f'[[models]]\nname = "m"\n[[tasks]]\nkind = "{kind}"\nmodel = "m"\n{options}\n'
    with pytest.raises(SuiteError, match=rf"tasks\[0\]\.{key}"):
        parse_suite(text, "s.toml", "toml")


def test_a_task_refuses_a_model_of_the_wrong_kind(tmp_path: Path) -> None:
    from PIL import Image

    model = tiny(ITM)
    with pytest.raises(TypeError, match="'caption' needs a captioning or VQA model"):
        TASK_KINDS["caption"]({}, model, 0, 2).prepare(lambda it, _: it)
    with pytest.raises(TypeError, match="BlipForImageTextRetrieval"):
        TASK_KINDS["vl-retrieval"]({}, tiny(CAPTION), 0, 2).prepare(lambda it, _: it)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="headline = 'reference' needs"):  # no captions
        TASK_KINDS["caption"](
            {"folder": str(tmp_path), "headline": "reference"}, tiny(CAPTION), 0, 2
        ).prepare(lambda it, _: it)


# ------------------------------------------------------------------- end to end
def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def test_a_tiny_vl_suite_runs_end_to_end_with_intervals(tmp_path: Path, capsys) -> None:
    photos_available()
    pytest.importorskip("pycocoevalcap")
    from turbo_eval.cli import main

    suite = tmp_path / "vl.toml"
    suite.write_text(
        textwrap.dedent(f"""\
        [suite]
        name = "tiny-vl"
        batch_size = 4
        methods = ["baseline", "redundancy", "turbo"]
        alpha = [5.0]
        throughput_batch = 2
        throughput_repeats = 1

        [[models]]
        name = "{CAPTION}"
        weights = "random"
        config = {_toml(TINY[CAPTION])}
        r = [4]

        [[tasks]]
        kind = "caption"
        model = "{CAPTION}"
        images = 4
        max_new_tokens = 4

        [[models]]
        name = "{ITM}"
        weights = "random"
        config = {_toml(TINY[ITM])}
        r = [4]

        [[tasks]]
        kind = "vl-retrieval"
        model = "{ITM}"
        images = 4
        """)
    )
    out = tmp_path / "results"
    assert main(["run", "--suite", str(suite), "--out", str(out), "--no-progress"]) == 0
    assert "token_agreement" in capsys.readouterr().out
    rows = json.loads((out / "table.json").read_text())
    assert len(rows) == 6  # 2 tasks x (baseline, redundancy, turbo)
    for row in rows:
        assert row["n_items"] == 4 and row["speedup"] > 0
        if row["method"] == "baseline":
            assert row["value"] == 1 and row["flops_ratio"] == pytest.approx(1)
            continue
        assert row["delta_low"] <= row["delta"] + 1e-12 <= row["delta_high"] + 2e-12
        assert row["flops_ratio"] > 1.05  # the timed generate / ITM call costs less
    assert {r["metric"] for r in rows} == {"token_agreement", "itm_spearman"}
    speed = json.loads(next((out / "speed").glob("*caption*.json")).read_text())
    assert set(speed["timing"]["groups"]) == {"4"}


def test_bench_times_the_generate_call_of_a_vl_model() -> None:
    from turbo_eval.commands.bench import bench_model

    model = tiny(CAPTION)
    model.speed_tokens = 3
    figures = bench_model(CAPTION, r_values=(4,), batch=2, repeats=1, loaded=model)
    rows = figures["configs"]
    assert rows["turbo r=4"]["tokens_after_last_block"] == 9  # 17 -> 13 -> 9
    assert rows["turbo r=4"]["flops_ratio"] > 1.05
