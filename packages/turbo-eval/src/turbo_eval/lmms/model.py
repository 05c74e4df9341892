"""The lmms-eval model ``turbo``: any transformers VLM Turbo supports, with a method and budget.

Registered through lmms-eval's ``lmms_eval.models`` entry-point group (turbo-eval's
``pyproject.toml``), so once turbo-eval and lmms-eval are installed::

    python -m lmms_eval --model turbo \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=cdpruner,budget=64 \\
        --tasks mme --output_path results/

Model arguments: ``pretrained`` (a local folder or hub id, loaded with
``AutoModelForImageTextToText`` and ``AutoProcessor``), ``method`` (``none``, ``turbo``,
``visionzip``, ``divprune``, ``cdpruner``, ``fastv``, ``pyramiddrop``, ``sparsevlm``),
``stage`` (``connector`` or ``llm``; the method's default when omitted), ``budget``
(tokens each image keeps: an int or a fraction), ``dtype``, ``device``,
``max_new_tokens`` (when the task sets none), ``token_log`` (a JSON-lines file that
gets one line per request with the prompt's length and the tokens the last decoder
layer saw at prefill). One process, one request at a time.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from torch import nn
from tqdm import tqdm

from turbo_adapters.vlm_methods import apply_vlm_method, default_stage

__all__ = ["TurboVLM"]


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The language model's decoder layers (the prefill length is read at the last one)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


class _PrefillProbe:
    """Sequence length entering the last decoder layer on the first call after ``reset``."""

    def __init__(self, model: nn.Module) -> None:
        self.tokens: int | None = None
        layers = _decoder_layers(model)
        self.handle = None
        if layers is None:
            warnings.warn(
                f"turbo lmms: no decoder layers found on {type(model).__name__}; "
                "token counts are not logged",
                stacklevel=3,
            )
        else:
            self.handle = layers[-1].register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self.tokens is None and isinstance(hidden, torch.Tensor):
            self.tokens = int(hidden.shape[1])

    def reset(self) -> None:
        self.tokens = None


class TurboVLM(lmms):  # type: ignore[misc]
    """A transformers vision-language model under a Turbo token-reduction method."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        stage: str | None = None,
        budget: int | float = 0.25,
        dtype: str = "float32",
        device: str | None = "cpu",
        batch_size: int | str = 1,
        max_new_tokens: int = 32,
        token_log: str | None = None,
        trust_remote_code: bool = False,
        **unused: Any,
    ) -> None:
        super().__init__()
        import transformers

        unused.pop("max_batch_size", None)
        if unused:
            raise ValueError(f"turbo lmms: unknown model arguments {sorted(unused)}")
        if int(batch_size) != 1:
            logger.warning(f"turbo lmms: batch_size={batch_size} ignored; requests run one by one")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"
        if not hasattr(torch, str(dtype)) or not isinstance(
            getattr(torch, str(dtype)), torch.dtype
        ):
            raise ValueError(
                f"dtype must name a torch dtype (float32, bfloat16 ...), got {dtype!r}"
            )
        self._device = torch.device(device)
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=getattr(torch, str(dtype)), trust_remote_code=trust_remote_code
        ).to(self._device)
        self.model.eval()
        self.processor = transformers.AutoProcessor.from_pretrained(
            pretrained, trust_remote_code=trust_remote_code
        )
        self.method = str(method)
        self.stage = default_stage(self.method) if stage in (None, "") else str(stage)
        self.budget = budget
        self.patch = apply_vlm_method(self.model, self.method, stage=stage or None, budget=budget)
        self.max_new_tokens = int(max_new_tokens)
        self.token_log = Path(token_log) if token_log else None
        self.probe = _PrefillProbe(self.model)
        logger.info(
            f"turbo lmms: {type(self.model).__name__} from {pretrained}, method={self.method}, "
            f"stage={self.stage}, budget={budget}"
        )

    # lmms-eval reads these
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    def _prompt(self, context: str, images: int) -> str:
        """The chat prompt with ``images`` image slots before the text (the processor's own
        template; without one, its image token before the text)."""
        token = getattr(self.processor, "image_token", "<image>")
        if token in context:  # the task placed its images itself
            images = 0
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * images + [{"type": "text", "text": context}]
            messages = [{"role": "user", "content": content}]
            return str(
                self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        return " ".join([token] * images + [context]) if images else context

    def _inputs(self, text: str, visuals: list[Any]) -> dict[str, torch.Tensor]:
        inputs = self.processor(images=visuals or None, text=text, return_tensors="pt")
        dtype = self.model.dtype
        return {
            k: v.to(self._device, dtype) if v.is_floating_point() else v.to(self._device)
            for k, v in inputs.items()
        }

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Any]:
        found = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        return [v for v in (found or []) if v is not None]

    def _record(self, doc_id: int, task: str, prompt_tokens: int) -> None:
        row = {
            "task": task, "doc_id": doc_id, "method": self.method, "stage": self.stage,
            "budget": self.budget, "prompt_tokens": prompt_tokens,
            "prefill_tokens": self.probe.tokens,
        }  # fmt: skip
        self._rows.append(row)
        if self.token_log is not None:
            with self.token_log.open("a") as out:
                out.write(json.dumps(row) + "\n")

    def _summary(self) -> None:
        seen = [r["prefill_tokens"] for r in self._rows if r["prefill_tokens"] is not None]
        if seen:
            prompt = sum(r["prompt_tokens"] for r in self._rows) / len(self._rows)
            logger.info(
                f"turbo lmms: {len(self._rows)} requests, prompt tokens {prompt:.1f} on average, "
                f"last decoder layer saw {sum(seen) / len(seen):.1f} at prefill"
            )

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, if the task asks) answers, cut at the task's stop strings."""
        self._rows: list[dict[str, Any]] = []
        answers = []
        for request in tqdm(requests, disable=self.rank != 0, desc="Turbo responding"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            inputs = self._inputs(self._prompt(context, len(visuals)), visuals)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            options: dict[str, Any] = {
                "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                "do_sample": temperature > 0,
                "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            }
            if temperature > 0:
                options["temperature"] = temperature
            self.probe.reset()
            with torch.inference_mode():
                out = self.model.generate(**inputs, **options)
            prompt_tokens = int(inputs["input_ids"].shape[1])
            text = self.processor.batch_decode(out[:, prompt_tokens:], skip_special_tokens=True)[0]
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            self._record(doc_id, task, prompt_tokens)
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        self._summary()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context (and whether greedy
        decoding would give it). Reductions only remove image tokens, which come before
        the text, so the continuation's logits are the last ones of the call. Context and
        continuation run as one call: methods guided by the text (``cdpruner``, and
        ``fastv``, ``pyramiddrop``, ``sparsevlm`` by the last tokens' attention) see the
        continuation too, so they may keep other tokens than when generating."""
        self._rows = []
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="Turbo scoring"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self._prompt(context, len(visuals))
            full = self._inputs(prompt + continuation, visuals)
            count = full["input_ids"].shape[1] - self._inputs(prompt, visuals)["input_ids"].shape[1]
            if count < 1:
                raise ValueError(f"turbo lmms: empty continuation for doc {doc_id} of {task}")
            self.probe.reset()
            with torch.inference_mode():
                logits = self.model(**full).logits[0, -count - 1 : -1].float()
            wanted = full["input_ids"][0, -count:]
            logprob = torch.log_softmax(logits, dim=-1).gather(1, wanted[:, None]).sum()
            greedy = bool((logits.argmax(dim=-1) == wanted).all())
            self._record(doc_id, task, int(full["input_ids"].shape[1]))
            results.append((float(logprob), greedy))
        self._summary()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("turbo lmms: multi-round generation is not implemented")
