"""An lmms-eval task on packaged data: easy-VQA questions, written to a folder offline.

``write_task(folder, count)`` copies the first ``count`` questions of easy-VQA's test split
(PyPI ``easy-vqa``: synthetic shapes, one-word answers) with their images into ``folder``
as a JSON-lines file beside a task YAML that lmms-eval reads with its ``json`` builder;
answers are scored by lmms-eval's own ``exact_match`` (case and punctuation ignored).
Pass the folder as ``--include_path`` and the task name as ``--tasks``. The YAML's
``doc_to_visual`` / ``doc_to_text`` name the functions below by their module path, so
nothing but data is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["TASK", "doc_to_text", "doc_to_visual", "write_task"]

#: the task's name in lmms-eval (``--tasks``)
TASK = "turbo_easy_vqa"

_YAML = """\
# written by turbo_eval.lmms.easy_vqa.write_task: easy-VQA (PyPI easy-vqa), {count} questions
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function turbo_eval.lmms.easy_vqa.doc_to_visual
doc_to_text: !function turbo_eval.lmms.easy_vqa.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_new_tokens: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""

_PROMPT = "{question} Answer with one word."


def write_task(
    folder: str | Path, count: int = 32, *, task: str = TASK, max_new_tokens: int = 3
) -> Path:
    """Write ``count`` easy-VQA test questions, their images and the task YAML to ``folder``.

    Returns:
        The YAML's path (its folder is the ``--include_path``).

    Raises:
        ValueError: ``count`` outside [1, the split's size] or ``max_new_tokens`` < 1.
        ImportError: easy-vqa is not installed.
    """
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(questions):
        raise ValueError(f"count must be an int in [1, {len(questions)}], got {count!r}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = easy_vqa.get_test_image_paths()
    rows = []
    for index in range(count):
        image = images / f"{image_ids[index]}.png"
        if not image.exists():
            shutil.copyfile(paths[image_ids[index]], image)
        rows.append(
            {
                "question_id": index,
                "question": questions[index],
                "answer": answers[index],
                "image": str(image.resolve()),
            }
        )
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / f"{task}.yaml"
    path.write_text(_YAML.format(task=task, count=count, max_new_tokens=max_new_tokens))
    return path


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The question's image (RGB), as lmms-eval's ``doc_to_visual`` returns it: a list."""
    from PIL import Image

    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: Any = None) -> str:
    """The question, asking for a one-word answer (the image is the model's to place)."""
    return _PROMPT.format(question=doc["question"])
