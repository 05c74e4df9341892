"""The lmms-eval door end to end: lmms-eval's own CLI runs ``--model turbo`` (found through
its ``lmms_eval.models`` entry point) on a tiny LLaVA saved to disk with its processor, on
an easy-VQA task written offline, scored by lmms-eval's ``exact_match``.

Each run's token log says what the last decoder layer saw at prefill: unpatched it is the
whole prompt, patched it is the prompt less exactly the image tokens the budget removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("easy_vqa")

from support import tiny_llava
from transformers import CLIPImageProcessor, LlavaProcessor

from turbo_eval.lmms import easy_vqa
from turbo_eval.vl.word_tokenizer import word_tokenizer

TESTS = Path(__file__).resolve().parents[1]
COUNT = 12  # easy-VQA questions
PER_IMAGE = tiny_llava.PER_IMAGE  # 64 image tokens per image, unpatched
TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _processor() -> LlavaProcessor:
    tokenizer = word_tokenizer(
        100, {"<pad>": tiny_llava.PAD, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": tiny_llava.IMG},
        unk_token="<unk>", template=("<s>", None),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )  # fmt: skip
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=4,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=TEMPLATE, image_token="<image>",
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmms")
    checkpoint = root / "tiny-llava"
    tiny_llava.build().save_pretrained(checkpoint)
    _processor().save_pretrained(checkpoint)
    task = easy_vqa.write_task(root / "task", COUNT)
    return {"root": root, "checkpoint": checkpoint, "task": task.parent}


def _run(setup: dict[str, Path], name: str, model_args: str) -> tuple[dict, list[dict]]:
    """lmms-eval's CLI in a fresh offline process; its results JSON and our token log."""
    out = setup["root"] / name
    log = out / "tokens.jsonl"
    out.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(setup["root"] / "hf-home"), "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }  # fmt: skip
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "turbo",
        "--model_args", f"pretrained={setup['checkpoint']},{model_args},token_log={log}",
        "--tasks", easy_vqa.TASK, "--include_path", str(setup["task"]),
        "--batch_size", "1", "--device", "cpu", "--output_path", str(out / "results"),
        "--verbosity", "INFO",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # lmms-eval logs an evaluation's exception and still exits 0
    assert "Error during evaluation" not in done.stdout, done.stdout[-3000:]
    files = sorted((out / "results").rglob("*results*.json"))
    assert files, f"no results file under {out / 'results'}:\n{done.stdout[-2000:]}"
    results = json.loads(files[-1].read_text())
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return results, rows


def _metric(results: dict) -> float:
    scores = results["results"][easy_vqa.TASK]
    key = next(k for k in scores if k.startswith("exact_match") and "stderr" not in k)
    value = float(scores[key])
    assert 0.0 <= value <= 1.0
    return value


def test_cli_unpatched_then_reduced(setup: dict[str, Path]) -> None:
    plain, plain_rows = _run(setup, "none", "method=none")
    _metric(plain)
    assert len(plain_rows) == COUNT
    # unpatched: the last decoder layer sees the whole prompt, image tokens included
    assert all(r["prefill_tokens"] == r["prompt_tokens"] for r in plain_rows)
    assert all(r["prompt_tokens"] > PER_IMAGE for r in plain_rows)

    budget = 16
    reduced, rows = _run(setup, "cdpruner", f"method=cdpruner,stage=connector,budget={budget}")
    _metric(reduced)
    assert reduced["config"]["model_args"].count("method=cdpruner") == 1
    assert len(rows) == COUNT
    assert [r["prompt_tokens"] for r in rows] == [r["prompt_tokens"] for r in plain_rows]
    # the connector cut each image from 64 tokens to the budget before the language model
    assert [r["prefill_tokens"] for r in rows] == [
        r["prompt_tokens"] - (PER_IMAGE - budget) for r in plain_rows
    ]


def test_cli_llm_stage(setup: dict[str, Path]) -> None:
    """FastV at decoder layer 2 of the tiny LLaVA's 4: the last layer sees half the image."""
    results, rows = _run(setup, "fastv", "method=fastv,budget=0.5")
    _metric(results)
    assert len(rows) == COUNT
    assert all(r["prefill_tokens"] == r["prompt_tokens"] - PER_IMAGE // 2 for r in rows)


@pytest.mark.parametrize("model_args", [{}, {"method": "turbo", "budget": 16}])
def test_loglikelihood_of_the_greedy_answer(setup: dict[str, Path], model_args: dict) -> None:
    """The answer ``generate_until`` gives is greedy under ``loglikelihood`` and its log-prob is
    the sum of ``generate``'s own step scores (the continuation aligned at the sequence's end,
    also when the connector shortened the image). Turbo's connector selection reads the
    image alone; a text-guided method would select with the continuation in view."""
    import torch
    from lmms_eval.api.instance import Instance

    from turbo_eval.lmms.model import TurboVLM

    lm = TurboVLM(pretrained=str(setup["checkpoint"]), **model_args)
    docs = [json.loads(line) for line in (setup["task"] / "data.jsonl").read_text().splitlines()]
    lm.task_dict = {easy_vqa.TASK: {"test": docs}}
    visual, text = easy_vqa.doc_to_visual, easy_vqa.doc_to_text

    def request(kind: str, index: int, second: object) -> Instance:
        args = (text(docs[index]), second, visual, index, easy_vqa.TASK, "test")
        meta = {"task": easy_vqa.TASK, "doc_id": index, "repeats": 1}
        return Instance(kind, args, 0, metadata=meta)

    asked = [request("generate_until", i, {"max_new_tokens": 3}) for i in range(3)]
    answers = lm.generate_until(asked)
    scored = [request("loglikelihood", i, " " + a) for i, a in enumerate(answers)]
    results = lm.loglikelihood(scored)
    for doc, answer, (logprob, greedy) in zip(docs, answers, results, strict=False):
        assert greedy, answer
        inputs = lm._inputs(lm._prompt(text(doc), 1), visual(doc))
        with torch.inference_mode():
            out = lm.model.generate(
                **inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        steps = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        expected = sum(float(step[token]) for step, token in zip(steps, new, strict=True))
        assert logprob == pytest.approx(expected, abs=1e-4)
