"""Tokenizers made in code for random-weight models, laid out on the config's vocabulary
and special ids (:func:`~turbo_eval.vl.word_tokenizer.word_tokenizer`)."""

from __future__ import annotations

from typing import Any

from .catalog import _PROMPT_WORDS, MINIGPT
from .word_tokenizer import word_tokenizer

__all__ = ["bert_tokenizer", "tokenizer_for"]


def tokenizer_for(family: str, architecture: str, config: Any) -> Any:
    """A word-level tokenizer laid out on the config's vocabulary and special ids."""
    free = _free_id
    if family == "blip":
        return bert_tokenizer(config.text_config, blip_text=True)
    if architecture == "Blip2ForImageTextRetrieval":
        return bert_tokenizer(config.qformer_config)
    text = config.llama if family == MINIGPT else config.text_config
    vocab = int(text.vocab_size)
    image = getattr(config, "image_token_id", None)
    if image is None:
        image = getattr(config, "image_token_index", None)
    placeholder = {} if image is None else {"<image>": int(image)}
    if getattr(text, "model_type", "") == "t5":
        pad, eos = int(text.pad_token_id), int(text.eos_token_id)
        taken = {pad, eos, *placeholder.values()}
        specials = {"<pad>": pad, "</s>": eos, **placeholder, "<unk>": free(2, taken, vocab)}
        template: tuple[str | None, str | None] = (None, "</s>")
        roles = {"pad_token": "<pad>", "eos_token": "</s>"}
    else:
        bos = int(text.bos_token_id if text.bos_token_id is not None else 1)
        eos = int(text.eos_token_id if text.eos_token_id is not None else 2)
        bos_name = "</s>" if bos == eos else "<s>"
        specials = {bos_name: bos, "</s>": eos, **placeholder}
        taken = {bos, eos, *placeholder.values()}
        roles = {"bos_token": bos_name, "eos_token": "</s>"}
        pad = text.pad_token_id
        if pad is not None and int(pad) not in taken:
            specials["<pad>"] = int(pad)
            taken.add(int(pad))
        specials["<unk>"] = free(3 if family == "blip2" else 0, taken, vocab)
        # the pad role: its own token, or the token already on the pad id, else <unk>
        by_id = {i: t for t, i in specials.items()}
        roles["pad_token"] = by_id[int(pad)] if pad is not None else "<unk>"
        template = (bos_name, None)
    return word_tokenizer(
        vocab, specials, unk_token="<unk>", template=template, extra_words=_PROMPT_WORDS, **roles
    )


def _free_id(preferred: int, taken: set[int], vocab: int) -> int:
    """``preferred`` if it is free, else the highest free id below the vocabulary's end."""
    index = preferred if preferred < vocab and preferred not in taken else vocab - 1
    while index in taken:
        index -= 1
    taken.add(index)
    return index


def bert_tokenizer(text: Any, blip_text: bool = False) -> Any:
    """A BERT-style word-level tokenizer (``[CLS] text [SEP]``) for BLIP's text side
    (``blip_text``: its ``[SEP]`` and ``[DEC]`` ids from the config) or a Q-Former."""
    vocab = int(text.vocab_size)
    pad = int(text.pad_token_id or 0)
    specials = {"[PAD]": pad}
    taken = {pad}
    if blip_text:
        specials["[SEP]"] = int(text.sep_token_id)
        specials["[DEC]"] = int(text.bos_token_id)
        taken |= {specials["[SEP]"], specials["[DEC]"]}
    else:
        specials["[SEP]"] = _free_id(102, taken, vocab)
    for token, preferred in (("[UNK]", 100), ("[CLS]", 101), ("[MASK]", 103)):
        specials[token] = _free_id(preferred, taken, vocab)
    roles = {"pad_token": "[PAD]", "sep_token": "[SEP]", "cls_token": "[CLS]"}
    roles.update(mask_token="[MASK]", eos_token="[SEP]")
    if blip_text:
        roles["bos_token"] = "[DEC]"
    return word_tokenizer(vocab, specials, unk_token="[UNK]", template=("[CLS]", "[SEP]"), **roles)
