"""How each vision-language model family is called: prompts, generation, teacher forcing, ITM.

One small class per family, all with the same methods, so the tasks never look at the
model class. Every method takes the module to run (the dense model or a model-side
copy of it) and only calls the library's public entry points (``generate``, ``forward``
and the sub-modules those entry points call themselves):

- generation heads (:class:`BlipCaptionHead`, :class:`BlipVQAHead`, :class:`Blip2Head`,
  :class:`InstructBlipHead`, :class:`LlavaHead`, :class:`MiniGPTHead`): ``inputs`` builds
  the prompt for a caption or a question, ``generate`` returns the greedy new tokens with
  the first step's logits, ``teacher_forced`` the logits that predict given tokens;
- matching heads (:class:`BlipITMHead`, :class:`Blip2ITMHead`): ``retrieval`` opens a
  :class:`RetrievalSession` (ITC similarities, ITM match probabilities of pairs).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Blip2Head",
    "Blip2ITMHead",
    "BlipCaptionHead",
    "BlipITMHead",
    "BlipVQAHead",
    "Generation",
    "Head",
    "InstructBlipHead",
    "LlavaHead",
    "MiniGPTHead",
    "RetrievalSession",
]

#: what a text is: a caption prompt or a question
PURPOSES = ("caption", "vqa")


@dataclasses.dataclass
class Generation:
    """Greedy output of a batch.

    Attributes:
        tokens: ``(B, T)`` new token ids, padded with the pad id to ``T`` columns.
        first_logits: ``(B, V)`` logits of the first generated token.
    """

    tokens: torch.Tensor
    first_logits: torch.Tensor


class Head(abc.ABC):
    """Base of the per-family call logic.

    Class attributes:
        kind: ``"generate"`` (captions and answers) or ``"match"`` (image-text matching).
        purposes: which texts the head answers (``"caption"``, ``"vqa"``).
    """

    kind: ClassVar[str] = "generate"
    purposes: ClassVar[tuple[str, ...]] = PURPOSES

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        pixels: Callable[[Sequence[Any]], torch.Tensor],
        prompts: dict[str, str],
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pixels = pixels
        self.prompts = prompts

    # -------------------------------------------------------------- ids
    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def text(self, text: str, purpose: str) -> str:
        """The prompt for ``text`` (a caption prompt or a question)."""
        if purpose not in self.purposes:
            raise ValueError(
                f"{type(self).__name__} answers {list(self.purposes)}, not {purpose!r}"
            )
        return self.prompts[purpose].format(text=text)

    # ------------------------------------------------------- interface
    @abc.abstractmethod
    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        """The model's keyword inputs for ``images`` with ``texts`` (prompts or questions)."""

    def generate(
        self, module: nn.Module, inputs: dict[str, Any], max_new_tokens: int, exact: bool = False
    ) -> Generation:
        """Greedy new tokens; ``exact`` makes every row generate ``max_new_tokens``.

        The model's own ``generate`` on ``inputs``; heads whose model needs more override it.
        """
        return self._greedy(module.generate, max_new_tokens, exact, **inputs)

    def teacher_forced(
        self, module: nn.Module, inputs: dict[str, Any], tokens: torch.Tensor
    ) -> torch.Tensor:
        """``(B, T, V)`` logits predicting ``tokens[:, t]`` from the prompt and ``tokens[:, :t]``."""
        raise NotImplementedError(
            f"{type(self).__name__} gives no teacher-forced caption logits "
            f"(it answers {list(self.purposes)} as a {self.kind!r} head)"
        )

    def speed(self, module: nn.Module, inputs: dict[str, Any], max_new_tokens: int) -> Any:
        """The timed call: generation of exactly ``max_new_tokens`` tokens."""
        return self.generate(module, inputs, max_new_tokens, exact=True).tokens

    # --------------------------------------------------------- helpers
    def _greedy(
        self, call: Callable[..., Any], max_new_tokens: int, exact: bool, **kwargs: Any
    ) -> Generation:
        out = call(
            **kwargs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if exact else 0,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
        steps = len(out.logits)
        tokens = out.sequences[:, out.sequences.shape[1] - steps :]
        if steps < max_new_tokens:  # every row ended early: pad to a fixed width
            tokens = F.pad(tokens, (0, max_new_tokens - steps), value=self.pad_id)
        return Generation(tokens, out.logits[0].float())

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            if row:
                ids[b, width - len(row) :] = torch.tensor(list(row))
                mask[b, width - len(row) :] = 1
        return ids, mask


# ------------------------------------------------------------------------ BLIP
class _BlipTextHead(Head):
    """BLIP's text side: its generate stops on [SEP] and pads with the text config's id."""

    @property
    def eos_id(self) -> int:
        return int(self.config.text_config.sep_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.config.text_config.pad_token_id)


class BlipCaptionHead(_BlipTextHead):
    """``BlipForConditionalGeneration``: the text decoder continues a caption prompt."""

    purposes = ("caption",)

    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        prompts = [self.text(t, purpose) for t in texts]
        encoded = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids = encoded.input_ids.clone()
        ids[:, 0] = self.config.text_config.bos_token_id  # as generate does
        return {"pixel_values": self.pixels(images), "prompt": ids[:, :-1]}

    def generate(
        self, module: nn.Module, inputs: dict[str, Any], max_new_tokens: int, exact: bool = False
    ) -> Generation:
        prompt = inputs["prompt"]
        # generate drops the prompt's last token (the [SEP] of the processor): add one back
        ids = torch.cat([prompt, prompt[:, -1:]], 1)
        return self._greedy(
            module.generate,
            max_new_tokens,
            exact,
            pixel_values=inputs["pixel_values"],
            input_ids=ids,
        )

    def teacher_forced(
        self, module: nn.Module, inputs: dict[str, Any], tokens: torch.Tensor
    ) -> torch.Tensor:
        prompt = inputs["prompt"]
        ids = torch.cat([prompt, tokens], 1)
        logits = module(pixel_values=inputs["pixel_values"], input_ids=ids).logits
        start = prompt.shape[1] - 1
        return logits[:, start : start + tokens.shape[1]].float()


class BlipVQAHead(_BlipTextHead):
    """``BlipForQuestionAnswering``: the answer decoder reads the image-grounded question."""

    purposes = ("vqa",)

    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        questions = [self.text(t, purpose) for t in texts]
        encoded = self.tokenizer(questions, padding=True, return_tensors="pt")
        return {
            "pixel_values": self.pixels(images),
            "input_ids": encoded.input_ids,
            "attention_mask": encoded.attention_mask,
        }


class Blip2Head(Head):
    """``Blip2ForConditionalGeneration`` (OPT or T5): query-token placeholders, then the
    prompt, left padded."""

    def _prompt_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text).input_ids)
        index = getattr(self.config, "image_token_id", None)
        if index is None:
            index = self.config.image_token_index
        return [int(index)] * int(self.config.num_query_tokens) + ids

    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        ids, mask = self._left_pad([self._prompt_ids(self.text(t, purpose)) for t in texts])
        return {"pixel_values": self.pixels(images), "input_ids": ids, "attention_mask": mask}

    @property
    def encoder_decoder(self) -> bool:
        return bool(getattr(self.config.text_config, "is_encoder_decoder", False))

    def teacher_forced(
        self, module: nn.Module, inputs: dict[str, Any], tokens: torch.Tensor
    ) -> torch.Tensor:
        steps = tokens.shape[1]
        if self.encoder_decoder:
            start = int(self.config.text_config.decoder_start_token_id)
            decoder = torch.cat([torch.full_like(tokens[:, :1], start), tokens[:, :-1]], 1)
            logits = module(**inputs, decoder_input_ids=decoder).logits
            return logits[:, :steps].float()
        feed = dict(inputs)
        feed["input_ids"] = torch.cat([inputs["input_ids"], tokens], 1)
        feed["attention_mask"] = F.pad(inputs["attention_mask"], (0, steps), value=1)
        logits = module(**feed).logits
        return logits[:, -steps - 1 : -1].float()


class InstructBlipHead(Blip2Head):
    """``InstructBlipForConditionalGeneration``: BLIP-2's layout for the language model,
    and the instruction once more for the Q-Former, read by its own (BERT) tokenizer.

    Args:
        qformer_tokenizer: the Q-Former's tokenizer (``InstructBlipProcessor.qformer_tokenizer``).
    """

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        pixels: Callable[[Sequence[Any]], torch.Tensor],
        prompts: dict[str, str],
        qformer_tokenizer: Any = None,
    ) -> None:
        if qformer_tokenizer is None:
            raise ValueError("InstructBLIP needs qformer_tokenizer (the Q-Former's tokenizer)")
        super().__init__(config, tokenizer, pixels, prompts)
        self.qformer_tokenizer = qformer_tokenizer

    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        inputs = super().inputs(images, texts, purpose)
        prompts = [self.text(t, purpose) for t in texts]
        encoded = self.qformer_tokenizer(prompts, padding=True, return_tensors="pt")
        inputs["qformer_input_ids"] = encoded.input_ids
        inputs["qformer_attention_mask"] = encoded.attention_mask
        return inputs


class LlavaHead(Head):
    """``LlavaForConditionalGeneration``: ``<image>`` expanded to the tower's token count."""

    def _expanded(self, text: str, pixels: torch.Tensor) -> list[int]:
        vision = self.config.vision_config
        count = (pixels.shape[-2] // vision.patch_size) * (pixels.shape[-1] // vision.patch_size)
        if self.config.vision_feature_select_strategy == "full":
            count += 1
        image = int(self.config.image_token_id)
        out: list[int] = []
        for token in self.tokenizer(text).input_ids:
            out += [image] * count if token == image else [int(token)]
        return out

    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        pixels = self.pixels(images)
        rows = [self._expanded(self.text(t, purpose), pixels) for t in texts]
        ids, mask = self._left_pad(rows)
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}

    def teacher_forced(
        self, module: nn.Module, inputs: dict[str, Any], tokens: torch.Tensor
    ) -> torch.Tensor:
        steps = tokens.shape[1]
        logits = module(
            pixel_values=inputs["pixel_values"],
            input_ids=torch.cat([inputs["input_ids"], tokens], 1),
            attention_mask=F.pad(inputs["attention_mask"], (0, steps), value=1),
        ).logits
        # tower mode shortens the image run, never the text: the tail is the same
        return logits[:, -steps - 1 : -1].float()


class MiniGPTHead(Head):
    """``turbo_adapters.models.MiniGPTv2``: ``[INST] <Img><ImageHere></Img> [task] text [/INST]``."""

    def _parts(self, text: str) -> tuple[list[int], list[int]]:
        from turbo_adapters.models.minigpt import IMAGE_HERE

        head, tail = text.split(IMAGE_HERE)
        before = list(self.tokenizer(head, add_special_tokens=True).input_ids)
        after = list(self.tokenizer(tail, add_special_tokens=False).input_ids)
        return before, after

    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        parts = [self._parts(self.text(t, purpose)) for t in texts]
        return {
            "pixels": self.pixels(images),
            "before": [p[0] for p in parts],
            "after": [p[1] for p in parts],
        }

    def generate(
        self, module: nn.Module, inputs: dict[str, Any], max_new_tokens: int, exact: bool = False
    ) -> Generation:
        return self._greedy(
            module.generate, max_new_tokens, exact, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id, **inputs,
        )  # fmt: skip

    def teacher_forced(
        self, module: nn.Module, inputs: dict[str, Any], tokens: torch.Tensor
    ) -> torch.Tensor:
        after = [list(a) + row for a, row in zip(inputs["after"], tokens.tolist(), strict=True)]
        embeds, mask = module.embed_prompts(
            inputs["pixels"], inputs["before"], after, pad_token_id=self.pad_id
        )
        logits = module.llama_model(inputs_embeds=embeds, attention_mask=mask).logits
        steps = tokens.shape[1]
        return logits[:, -steps - 1 : -1].float()


# ------------------------------------------------------------------- matching
class RetrievalSession:
    """ITC similarities and ITM match probabilities for fixed images and texts.

    Args:
        itc: ``() -> (I, T)`` similarities.
        itm: ``(image_idx, text_idx) -> (n,)`` match probabilities of those pairs.
        shape: ``(I, T)``: how many images and texts.
        batch_size: pairs per ITM call.
    """

    def __init__(
        self,
        itc: Callable[[], torch.Tensor],
        itm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, int],
        batch_size: int,
    ) -> None:
        self._itc = itc
        self._itm = itm
        self.shape = shape
        self.batch_size = batch_size

    @torch.inference_mode()
    def itc(self) -> torch.Tensor:
        return self._itc().float()

    @torch.inference_mode()
    def itm(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        """Match probabilities of pairs, computed ``batch_size`` pairs at a time."""
        out = [
            self._itm(image_idx[s : s + self.batch_size], text_idx[s : s + self.batch_size])
            for s in range(0, len(image_idx), self.batch_size)
        ]
        return torch.cat(out).float() if out else torch.empty(0)

    def itm_matrix(self) -> torch.Tensor:
        """``(T, I)`` ITM probability of every text against every image."""
        images, texts = self.shape
        text_idx = torch.arange(texts).repeat_interleave(images)
        image_idx = torch.arange(images).repeat(texts)
        return self.itm(image_idx, text_idx).view(texts, images)


class BlipITMHead(Head):
    """``BlipForImageTextRetrieval``: ITC from the CLS, ITM from the text encoder's
    cross-attention over the image tokens (each image encoded once per session)."""

    kind = "match"
    purposes = ("caption",)

    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        encoded = self.tokenizer(
            [self.text(t, purpose) for t in texts], padding=True, return_tensors="pt"
        )
        return {
            "pixel_values": self.pixels(images),
            "input_ids": encoded.input_ids,
            "attention_mask": encoded.attention_mask,
        }

    def speed(self, module: nn.Module, inputs: dict[str, Any], max_new_tokens: int) -> Any:
        return module(**inputs, use_itm_head=True).itm_score

    def retrieval(
        self, module: nn.Module, images: Sequence[Any], texts: Sequence[str], batch_size: int
    ) -> RetrievalSession:
        # the same calls as BlipForImageTextRetrieval.forward, with every image encoded once
        tok = self.tokenizer([self.text(t, "caption") for t in texts], padding=True)
        ids, mask = torch.tensor(tok.input_ids), torch.tensor(tok.attention_mask)
        parts = [
            module.vision_model(
                pixel_values=self.pixels(images[s : s + batch_size])
            ).last_hidden_state
            for s in range(0, len(images), batch_size)
        ]
        embeds, sizes = torch.cat(parts), _cat_sizes(parts)

        def itc() -> torch.Tensor:
            text = module.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            image_feat = F.normalize(module.vision_proj(embeds[:, 0]), dim=-1)
            text_feat = F.normalize(module.text_proj(text[:, 0]), dim=-1)
            return image_feat @ text_feat.T

        def itm(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
            image = embeds[image_idx]
            if sizes is not None:  # merged tokens keep their sizes, as in the library forward
                _hang_sizes(image, sizes[image_idx])
            out = module.text_encoder(
                input_ids=ids[text_idx],
                attention_mask=mask[text_idx],
                encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
            ).last_hidden_state
            return module.itm_head(out[:, 0]).softmax(-1)[:, 1]

        return RetrievalSession(itc, itm, (len(images), len(texts)), batch_size)


def _cat_sizes(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``(B, N, 1)`` Turbo token sizes of batches of image tokens (None: none merged)."""
    from turbo_adapters import token_sizes

    found = [token_sizes(part) for part in parts]
    if all(size is None for size in found):
        return None
    return torch.cat(
        [
            part.new_ones((*part.shape[:2], 1)) if size is None else size
            for part, size in zip(parts, found, strict=True)
        ]
    )


def _hang_sizes(image: torch.Tensor, sizes: torch.Tensor) -> None:
    """Give ``image`` the token sizes a patched vision tower's own output carries."""
    from turbo_adapters.blocks import attach_sizes
    from turbo_core import ReductionState

    attach_sizes(image, ReductionState(num_blocks=1, size=sizes, block_index=1))


class Blip2ITMHead(Head):
    """``Blip2ForImageTextRetrieval``: the Q-Former's ITM and ITC heads, through the
    model's own forward (the vision tower runs once per pair batch)."""

    kind = "match"
    purposes = ("caption",)

    def _text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer([self.text(t, "caption") for t in texts], padding=True)
        ids, mask = torch.tensor(tok.input_ids), torch.tensor(tok.attention_mask)
        index = self.config.image_token_index
        if index is not None:  # the processor puts the query placeholders first
            queries = int(self.config.num_query_tokens)
            ids = torch.cat([torch.full((len(ids), queries), int(index)), ids], 1)
            mask = F.pad(mask, (queries, 0), value=1)
        return ids, mask

    def inputs(self, images: Sequence[Any], texts: Sequence[str], purpose: str) -> dict[str, Any]:
        ids, mask = self._text(texts)
        return {"pixel_values": self.pixels(images), "input_ids": ids, "attention_mask": mask}

    def speed(self, module: nn.Module, inputs: dict[str, Any], max_new_tokens: int) -> Any:
        return module(**inputs, use_image_text_matching_head=True).logits_per_image

    def retrieval(
        self, module: nn.Module, images: Sequence[Any], texts: Sequence[str], batch_size: int
    ) -> RetrievalSession:
        pixels = torch.cat(
            [self.pixels(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
        )
        ids, mask = self._text(texts)

        def itc() -> torch.Tensor:
            out = module(
                pixel_values=pixels, input_ids=ids, attention_mask=mask,
                use_image_text_matching_head=False,
            )  # fmt: skip
            return out.logits_per_image

        def itm(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
            out = module(
                pixel_values=pixels[image_idx], input_ids=ids[text_idx],
                attention_mask=mask[text_idx], use_image_text_matching_head=True,
            )  # fmt: skip
            return out.logits_per_image.softmax(-1)[:, 1]

        return RetrievalSession(itc, itm, (len(images), len(texts)), batch_size)
