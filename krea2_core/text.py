"""Caption keywords: what the offline SAE feature labeller and cluster namer read from captions."""

from __future__ import annotations

import re

STOPWORDS = frozenset(
    "a an the this that these those and or but of in on at to for from with without by as is are was were be "
    "been it its their there here over under near into onto up down out very some any all each other another few "
    "many more most no not than too so such against between while has have having image images picture pictures "
    "photo photos photograph shot view close closeup showing shows shown depicting featuring background "
    "one two three four five six seven eight nine ten first second third several".split()
)
_WORD = re.compile(r"[a-z]+")


def content_words(caption: str) -> list[str]:
    """Lowercased words of ``caption`` in order, with stopwords and single letters left out as None, so
    callers can tell adjacent content words from ones a stopword separates."""
    return [w if w not in STOPWORDS and len(w) > 1 else None for w in _WORD.findall(caption.lower())]
