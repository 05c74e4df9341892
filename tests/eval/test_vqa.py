"""turbo_eval.vqa: loaders for the VQA formats; fidelity of a patched LLaVA on easy-VQA images.

The VQA accuracy has its tests with the other vision-language metrics (test_vl_metrics.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from turbo_eval.assets.easy_vqa import load_easy_vqa
from turbo_eval.vl_metrics import answer_agreement, first_token_kl, vqa_accuracy
from turbo_eval.vqa import VQAItem, load_gqa, load_vizwiz, load_vqa_v2


def test_accuracy_by_hand() -> None:
    ten = ["2"] * 3 + ["3"] * 7
    # leave-one-out: 3 subsets keep 2 matches (2/3), 7 keep 3 (1.0)
    assert vqa_accuracy(["two"], [ten]) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy(["three"], [ten]) == 1.0
    assert vqa_accuracy(["four"], [ten]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy(["x"], [])


def test_loaders_read_each_format(tmp_path: Path) -> None:
    (tmp_path / "q.json").write_text(
        json.dumps({"questions": [{"question_id": 7, "image_id": 42, "question": "what?"}]})
    )
    (tmp_path / "a.json").write_text(
        json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer": "cat"}] * 10}]})
    )
    (tmp_path / "gqa.json").write_text(
        json.dumps({"201": {"imageId": "n1", "question": "is it?", "answer": "no"}})
    )
    (tmp_path / "viz.json").write_text(
        json.dumps([{"image": "VizWiz_1.jpg", "question": "hm?", "answers": [{"answer": "a"}]}])
    )
    vqa = load_vqa_v2(tmp_path / "q.json", tmp_path / "a.json", tmp_path)
    assert (
        vqa[0].image == tmp_path / "COCO_val2014_000000000042.jpg"
        and vqa[0].answers == ("cat",) * 10
    )
    gqa = load_gqa(tmp_path / "gqa.json", tmp_path)
    assert gqa[0].image == tmp_path / "n1.jpg" and gqa[0].answers == ("no",)
    viz = load_vizwiz(tmp_path / "viz.json", tmp_path)
    assert viz[0].image == tmp_path / "VizWiz_1.jpg" and viz[0].answers == ("a",)


def test_easy_vqa_is_real_packaged_data() -> None:
    pytest.importorskip("easy_vqa")
    import easy_vqa

    items = load_easy_vqa("test", limit=20)
    assert len(items) == 20 and all(isinstance(i, VQAItem) for i in items)
    assert all(i.image.dtype == np.uint8 and i.image.shape[2] == 3 for i in items)
    assert len({i.question_id for i in items}) == 20
    assert {a for i in items for a in i.answers} <= set(easy_vqa.get_answers())


def test_fidelity_of_tower_mode_on_easy_vqa_images() -> None:
    pytest.importorskip("easy_vqa")
    from PIL import Image
    from support import tiny_llava as cases

    import turbo_adapters as ta

    items = load_easy_vqa("test", limit=3)
    images = [
        np.asarray(Image.fromarray(i.image).resize((32, 32)), dtype=np.float32) for i in items
    ]
    px = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5) - 1.0
    model = cases.build(seed=4)
    ids, mask = cases.left_pad(cases.rows([1, 1, 1]))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4,
                min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        return out.sequences[:, ids.shape[1] :], out.logits[0]

    tokens, logits = run()
    with ta.patched(model, r=0):
        same, same_logits = run()
    with ta.patched(model, r=6):
        merged, merged_logits = run()
    assert answer_agreement(same, tokens) == 1.0
    assert first_token_kl(same_logits, logits) < 1e-8
    assert first_token_kl(merged_logits, logits) > 1e-6  # merging changed the distribution
    assert 0.0 <= answer_agreement(merged, tokens) <= 1.0
