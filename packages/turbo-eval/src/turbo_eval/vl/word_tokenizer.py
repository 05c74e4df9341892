"""A word-level tokenizer built in code, for vision-language models with random weights.

Nothing is downloaded: the vocabulary is a fixed list of common caption and question
words (plus easy-VQA's answers), laid out to fill the model's whole vocabulary so every
id the model can generate decodes to a token. Special tokens sit at the ids the
model's config names (BLIP: ``[PAD]`` 0, ``[SEP]`` 102, ``[DEC]`` 30522 ...); unknown
words map to the unknown token. The result is a ``transformers``
``PreTrainedTokenizerFast`` (``tokenizers`` ``WordLevel`` model), so it pads, batches,
decodes and saves like any other tokenizer. Users with real checkpoints load the
checkpoint's own tokenizer instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["WORDS", "word_tokenizer"]

_WORD_TEXT = """
    a an the of in on at to with and or is are was were be been it its this that these
    those there here what which who whom whose where when why how many much some any
    no not yes one two three four five six seven eight nine ten zero none several few
    man men woman women person people boy girl child children baby player players
    dog dogs cat cats horse horses bird birds cow cows sheep elephant elephants bear
    giraffe zebra animal animals fish car cars truck bus train plane airplane boat
    bike bicycle motorcycle street road sidewalk building buildings house city sky
    cloud clouds tree trees grass field park beach water ocean sea lake river snow
    mountain mountains hill rock rocks sand table chair couch bed room kitchen window
    door wall floor plate food pizza sandwich cake fruit banana apple orange bowl cup
    glass bottle phone computer laptop keyboard screen book books sign light clock
    umbrella hat shirt jacket bag ball frisbee kite skateboard surfboard skis tennis
    racket bat glove game picture photo image view scene close up top bottom front
    back side left right middle near next behind under over above below inside
    outside around across through down into onto off out from by for about
    sitting standing walking running riding holding playing eating looking flying
    lying laying parked driving carrying wearing talking watching using waiting
    small large big little tall short long old young new white black red blue green
    yellow brown gray grey orange pink purple teal dark bright colorful wooden metal
    empty full open closed busy sunny cloudy
    circle circles rectangle rectangles triangle triangles shape shapes color colors
    colour colours present contain contains containing does do
    astronaut coffee rocket coins text page brick gravel camera cells face portrait
    moon stars space telescope galaxy campus lab robot vehicle traffic cars frame
    describe briefly short caption answer question photograph user assistant
    ? . , ' : ! s
"""
#: Common words of image captions and visual questions (lower case).
WORDS = tuple(_WORD_TEXT.split())

_EASY_VQA_EXTRA = ("circle", "rectangle", "triangle", "shape", "color", "yes", "no")


def _words(extra: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for word in (*WORDS, *_EASY_VQA_EXTRA, *extra):
        seen.setdefault(word.lower(), None)
    try:  # easy-VQA's answers, when the package is installed
        import easy_vqa

        for word in easy_vqa.get_answers():
            seen.setdefault(str(word).lower(), None)
    except ImportError:
        pass
    return list(seen)


def word_tokenizer(
    vocab_size: int,
    specials: Mapping[str, int],
    *,
    unk_token: str,
    template: tuple[str | None, str | None] = (None, None),
    extra_words: Iterable[str] = (),
    **special_roles: str,
) -> Any:
    """A ``PreTrainedTokenizerFast`` over exactly ``vocab_size`` ids.

    Args:
        vocab_size: the model's vocabulary size (every id gets a token).
        specials: special token -> its id (``{"[PAD]": 0, "[SEP]": 102}``); must
            include ``unk_token``. All are matched whole, before words are split.
        unk_token: the token unknown words become.
        template: tokens put before and after every text (``("[CLS]", "[SEP]")`` for
            BERT-style models, ``("<s>", None)`` for LLaMA-style ones).
        extra_words: more vocabulary words (after :data:`WORDS`).
        **special_roles: ``pad_token="[PAD]"``, ``bos_token=...``: the roles for
            ``transformers`` (each must be in ``specials``).

    Raises:
        ValueError: a special id outside the vocabulary, two specials on one id, or a
            role or template token that is not a special.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    bad = {t: i for t, i in specials.items() if not 0 <= i < vocab_size}
    if bad:
        raise ValueError(f"special token ids must be in [0, {vocab_size - 1}], got {bad}")
    if len(set(specials.values())) != len(specials):
        raise ValueError(f"two special tokens share an id: {dict(specials)}")
    named = {"unk_token": unk_token, **special_roles}
    named.update({f"template[{i}]": t for i, t in enumerate(template) if t is not None})
    missing = {role: t for role, t in named.items() if t not in specials}
    if missing:
        raise ValueError(f"tokens {missing} must be in specials {sorted(specials)}")

    by_id: dict[int, str] = {i: t for t, i in specials.items()}
    free = (i for i in range(vocab_size) if i not in by_id)
    for word in _words(extra_words):
        if word in specials:
            continue
        index = next(free, None)
        if index is None:
            break
        by_id[index] = word
    for index in free:  # every remaining id decodes to a placeholder of its own
        by_id[index] = f"[unused{index}]"
    vocab = {token: index for index, token in by_id.items()}

    backend = Tokenizer(WordLevel(vocab, unk_token=unk_token))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    before, after = template
    if before or after:
        single = " ".join(t for t in (before, "$A", after) if t)
        pair = " ".join(t for t in (before, "$A", after, "$B:1", after and f"{after}:1") if t)
        backend.post_processor = processors.TemplateProcessing(
            single=single,
            pair=pair,
            special_tokens=[(t, specials[t]) for t in (before, after) if t],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[t for t in specials if t not in named.values()],
        **named,
    )
    # keep the roles; the template tokens are specials too (skipped when decoding)
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer
