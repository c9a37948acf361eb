"""SFT data for the prompt expander (report, "Prompt Expansion"): pairs of under-specified user prompt -> expanded,
model-friendly caption, with a short thinking trace (intent reconstruction) in between.

A writer LLM reads each sampled long caption and writes the short, conversational request a user might have typed
for it; given that request and the expansion it then writes what the user wants and which visual details the
expansion adds. The long caption is the expansion. Distribution shaping: artistic captions are drawn with
``artistic_weight`` and a ``photo_bias`` share of the photographic ones open their expansion with a photographic
medium phrase, so the expander learns to turn plain requests into photorealistic descriptions.

Nothing is dropped: a failed, empty, caption-copying or unfaithful generation falls back to a deterministic text
and the row is flagged (``user_fallback``, ``user_not_shorter``, ``user_copy``, ``user_unfaithful``,
``thinking_fallback``; ``*_truncated`` when a generation was cut to its word limit). A user prompt is unfaithful
when it asks for something the caption does not show: a claim in the world's vocabulary (a coloured shape group,
a background, a quoted word) that the caption does not state, or mostly content words the caption lacks (a small
writer invents "a person's favourite colour"); an expander trained on such pairs would learn to drop requests.

Artifact (kind ``expander_data``): ``pairs.parquet`` (schema ``ExpanderPairs``), ``examples.json`` (a few pairs per
style, to read).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from krea2_core.artifacts import read_manifest
from krea2_core.captioning.llm import ChatLLM, Generated, LocalChatLLM, Messages
from krea2_core.captioning.rewriter import clean_generation, generate_isolated, cut_words, first_sentence
from krea2_core.captioning.stages import CAPTIONS_FILE
from krea2_core.data.schemas import Captions, ExpanderPairs, read_table, write_table
from krea2_core.expander.config import ExpanderDataConfig
from krea2_core.expander.faithfulness import faithfulness, parse_requirements
from krea2_core.expander.format import THINK_CLOSE, THINK_OPEN
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.text import content_words
from krea2_core.tracking import StageRun
from krea2_core.training.config import PRETRAIN_STAGES

EXPANDER_PAIRS_FILE = "pairs.parquet"
EXAMPLES_FILE = "examples.json"
EXAMPLES_PER_STYLE = 3
STYLES = ("artistic", "photo", "other")
# medium-only openings: they state how the image was made and add no content the user could not have meant
PHOTO_MEDIA = ("A photograph.", "A high-resolution photograph.", "A 35mm film photograph.", "A sharp digital photo.")
COPY_SHARE = 0.5  # a user prompt naming more than this share of the caption's content words copies it
INVENTED_SHARE = 0.5  # ... one whose content words are mostly not in the caption invents its request
# how people ask, not what they ask for: not counted as invented content
REQUEST_WORDS = frozenset({"make", "create", "draw", "generate", "render", "paint", "design", "show", "want", "need",
                           "image", "picture", "pic", "photo", "please", "pls", "thanks", "like", "could", "would",
                           "can", "give", "get", "some", "something", "nice", "cool"})
THINKING_DETAILS = 8  # added details the fallback thinking template names

_USER_SYSTEM = "You imagine what people type into an image generator. Reply with the request only."
_THINK_SYSTEM = ("You explain how a short image request was turned into a detailed image description. "
                 "Reply with the explanation only.")


def user_prompt_messages(caption: str, limit: int) -> Messages:
    return [{"role": "system", "content": _USER_SYSTEM},
            {"role": "user", "content": f"Write the short, casual request (at most {limit} words) a person might "
                                        "have typed to get this image. Name the main subject and leave most details "
                                        f"out.\n\n{caption}"}]


def thinking_messages(user: str, expansion: str, limit: int) -> Messages:
    return [{"role": "system", "content": _THINK_SYSTEM},
            {"role": "user", "content": f"Request: {user}\nDescription: {expansion}\n\nIn at most {limit} words, say "
                                        "what the user wants and which visual details the description adds."}]


@functools.lru_cache(maxsize=8)
def _whole_words(words: tuple[str, ...]) -> re.Pattern[str] | None:
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def classify_style(caption: str, config: ExpanderDataConfig) -> str:
    """"artistic", "photo" or "other" by whole-word, case-insensitive match of the config's word lists.

    Artistic words win over photographic ones ("a photo of a watercolor painting" is artistic): the photographic
    bias must never relabel artwork as a photograph, and oversampling then errs toward art.
    """
    for style, words in (("artistic", config.artistic_words), ("photo", config.photo_words)):
        pattern = _whole_words(tuple(words))
        if pattern is not None and pattern.search(caption):
            return style
    return "other"


def usable_captions(captions: pd.DataFrame, config: ExpanderDataConfig, where: str = "the captions table"
                    ) -> pd.DataFrame:
    """Rows without an error, with a non-empty long caption written by something (source != "none"), each with its
    ``style``; none at all is a ValueError."""
    usable = captions[captions["error"].isna() & captions["long"].str.strip().ne("") & captions["source"].ne("none")]
    if usable.empty:
        raise ValueError(f"{where}: none of its {len(captions)} rows is usable for expander data (every row has an "
                         "error, an empty long caption or source 'none')")
    return usable.assign(style=[classify_style(c, config) for c in usable["long"]]).reset_index(drop=True)


def sample_captions(usable: pd.DataFrame, config: ExpanderDataConfig) -> pd.DataFrame:
    """``min(n_pairs, len(usable))`` rows drawn without replacement (seeded), artistic ones with ``artistic_weight``
    against 1 for any other; in draw order."""
    weights = np.where(usable["style"].eq("artistic"), config.artistic_weight, 1.0)
    n = min(config.n_pairs, len(usable))
    order = np.random.default_rng(config.seed).choice(len(usable), size=n, replace=False, p=weights / weights.sum())
    return usable.iloc[order].reset_index(drop=True)


def photo_media(styles: Sequence[str], share: float, seed: int) -> list[str]:
    """Per row: a photographic medium phrase for ``share`` of the photographic rows (rounded half up; seeded), else
    ""."""
    rng = np.random.default_rng([seed, 1])
    photos = [i for i, style in enumerate(styles) if style == "photo"]
    chosen = rng.permutation(photos)[:math.floor(share * len(photos) + 0.5)] if photos else []
    out = [""] * len(styles)
    for i in chosen:
        out[i] = PHOTO_MEDIA[rng.integers(len(PHOTO_MEDIA))]
    return out


def split_labels(n: int, val_fraction: float, seed: int) -> list[str]:
    """"train"/"val" per row: ``round(val_fraction * n)`` seeded rows to val, at least one when
    ``val_fraction > 0`` and ``n >= 2``, never all of them."""
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    labels = np.full(n, "train", dtype=object)
    labels[np.random.default_rng([seed, 2]).permutation(n)[:n_val]] = "val"
    return labels.tolist()


def copies_caption(user: str, caption: str) -> str:
    """Why a written user prompt is no user prompt for ``caption``: "user_not_shorter" (at least as many words),
    "user_copy" (names more than ``COPY_SHARE`` of the caption's distinct content words), or "" when it is fine."""
    if len(user.split()) >= len(caption.split()):
        return "user_not_shorter"
    wanted = {w for w in content_words(caption) if w}
    named = wanted.intersection(w for w in content_words(user) if w)
    return "user_copy" if wanted and len(named) > COPY_SHARE * len(wanted) else ""


def invents_request(user: str, caption: str) -> bool:
    """True when ``user`` asks for what ``caption`` does not show (module docstring)."""
    # totals are left out: a request may name only some of the caption's shapes
    claims = [r for r in parse_requirements(user) if r.kind != "count"]
    if claims and faithfulness(claims, caption) < 1.0:
        return True
    asked = [w for w in content_words(user) if w and w not in REQUEST_WORDS]
    shown = {w for w in content_words(caption) if w}
    return bool(asked) and sum(w not in shown for w in asked) > INVENTED_SHARE * len(asked)


def fallback_user(row: Mapping[str, str], limit: int) -> str:
    """The captioning stage's conversational variant, else its short one, else the caption's first sentence."""
    text = next((t for t in (row["conversational"], row["short"]) if t.strip()), first_sentence(row["long"]))
    return cut_words(text, limit)[0]


def finish_user(generated: Generated | None, row: Mapping[str, str], limit: int) -> tuple[str, list[str]]:
    """(user prompt, flags) from a generation (None: it failed) for caption row ``row``."""
    text = clean_generation(generated.text) if generated is not None else ""
    problem = ("user_fallback" if not text else copies_caption(text, row["long"])
               or ("user_unfaithful" if invents_request(text, row["long"]) else ""))
    if problem:
        return fallback_user(row, limit), [problem]
    text, cut = cut_words(text, limit)
    return text, ["user_truncated"] if cut or generated.truncated else []


def thinking_template(user: str, expansion: str) -> str:
    """A deterministic intent-reconstruction trace: the request, and the expansion's content words it lacks."""
    asked = {w for w in content_words(user) if w}
    added = list(dict.fromkeys(w for w in content_words(expansion) if w and w not in asked))[:THINKING_DETAILS]
    return f'Asked for "{user}". Keeping that, the description adds: {", ".join(added) or "nothing more"}.'


def finish_thinking(generated: Generated | None, user: str, expansion: str, limit: int) -> tuple[str, list[str]]:
    """(thinking, flags); the trace may not contain the format's think tags (they would end it early)."""
    text = clean_generation(generated.text) if generated is not None else ""
    text = text.replace(THINK_OPEN, " ").replace(THINK_CLOSE, " ").strip()
    if not text:
        return cut_words(thinking_template(user, expansion), limit)[0], ["thinking_fallback"]
    text, cut = cut_words(text, limit)
    return text, ["thinking_truncated"] if cut or generated.truncated else []


def _generate(llm: ChatLLM, prompts: list[Messages], config: ExpanderDataConfig, desc: str
              ) -> list[Generated | None]:
    out: list[Generated | None] = []
    for start in tqdm(range(0, len(prompts), config.batch_size), desc=desc, mininterval=5):
        out += generate_isolated(llm, prompts[start:start + config.batch_size], config.max_new_tokens,
                                  config.batch_size)
    return out


def write_pairs(rows: pd.DataFrame, config: ExpanderDataConfig, llm: ChatLLM) -> pd.DataFrame:
    """The pairs of sampled caption rows (``sample_captions``): two batched generations (user prompts, then thinking
    traces), fallbacks, photographic medium, split. Columns as ``ExpanderPairs``."""
    captions = rows.to_dict("records")
    generated = _generate(llm, [user_prompt_messages(c["long"], config.user_words) for c in captions], config,
                          "expander data: user prompts")
    users = [finish_user(g, c, config.user_words) for g, c in zip(generated, captions, strict=True)]
    media = photo_media(rows["style"].tolist(), config.photo_bias, config.seed)
    expansions = [f"{m} {c['long']}" if m else c["long"] for m, c in zip(media, captions, strict=True)]
    generated = _generate(llm, [thinking_messages(u, e, config.thinking_words)
                                for (u, _), e in zip(users, expansions, strict=True)], config, "expander data: thinking")
    traces = [finish_thinking(g, u, e, config.thinking_words)
              for g, (u, _), e in zip(generated, users, expansions, strict=True)]
    return pd.DataFrame({
        "id": rows["id"].tolist(), "user": [u for u, _ in users], "thinking": [t for t, _ in traces],
        "expansion": expansions, "style": rows["style"].tolist(), "photo_medium": [bool(m) for m in media],
        "split": split_labels(len(rows), config.val_fraction, config.seed),
        "flags": [",".join(uf + tf) for (_, uf), (_, tf) in zip(users, traces, strict=True)]})


def _words(texts: pd.Series) -> float:
    return float(texts.str.split().str.len().mean())


def pair_stats(pairs: pd.DataFrame) -> tuple[dict[str, int], dict[str, float]]:
    """(counts: pairs per style and split, photo_medium, per flag; metrics: fallback rate per field, per-flag rates,
    mean words of user prompts / thinking / expansions)."""
    flags = pd.Series([f for row in pairs["flags"] for f in row.split(",") if f], dtype=object).value_counts()
    counts = {"pairs": len(pairs), "photo_medium": int(pairs["photo_medium"].sum()),
              **{f"style.{s}": int(pairs["style"].eq(s).sum()) for s in STYLES},
              **{f"split.{s}": int(pairs["split"].eq(s).sum()) for s in ("train", "val")},
              **{f"flag.{name}": int(n) for name, n in flags.items()}}
    row_flags = pairs["flags"].str.split(",")
    fallback = {"user": {"user_fallback", "user_not_shorter", "user_copy", "user_unfaithful"},
                "thinking": {"thinking_fallback"}}
    metrics = {f"fallback_rate.{field}": float(row_flags.map(lambda f, names=names: bool(names & set(f))).mean())
               for field, names in fallback.items()}
    metrics |= {f"flag_rate.{name}": n / len(pairs) for name, n in flags.items()}
    metrics |= {f"words.{col}": _words(pairs[col]) for col in ("user", "thinking", "expansion")}
    return counts, metrics


def examples(pairs: pd.DataFrame) -> list[dict[str, object]]:
    """A few pairs of each style, for people to read."""
    picked = pairs.groupby("style", sort=False).head(EXAMPLES_PER_STYLE)
    return picked[["id", "style", "photo_medium", "user", "thinking", "expansion", "flags"]].to_dict("records")


def run_expander_data(inputs: Mapping[str, Path], settings: ExpanderDataConfig, parent_run_id: str = "", *,
                      root: Path | None = None, llm: ChatLLM | None = None) -> Path:
    """Write the expander's SFT pairs from a ``captions`` artifact; the writer is ``settings.writer_model`` unless
    ``llm`` is given (tests). Returns the ``expander_data`` artifact directory."""
    read_manifest(inputs["captions"], kind="captions")

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        path = paths["captions"] / CAPTIONS_FILE
        table = read_table(path, Captions)
        usable = usable_captions(table, settings, str(path))
        rows = sample_captions(usable, settings)
        writer = llm or LocalChatLLM.load(settings.writer_model, settings.device)
        start = time.perf_counter()
        pairs = write_table(write_pairs(rows, settings, writer), staging / EXPANDER_PAIRS_FILE, ExpanderPairs)
        seconds = time.perf_counter() - start
        (staging / EXAMPLES_FILE).write_text(json.dumps(examples(pairs), indent=2))
        counts, metrics = pair_stats(pairs)
        return StageOutput(counts={"captions": len(table), "usable": len(usable), **counts},
                           metrics={**metrics, "seconds": seconds, "pairs_per_s": len(pairs) / max(seconds, 1e-9)})

    return execute_stage(EXPANDER_DATA.name, EXPANDER_DATA.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id, root=root)[0]


# the captions of the first resolution stage's images: the broadest set (its filters are the most permissive)
EXPANDER_DATA = StageSpec("expander_data", "expander_data", {"captions": f"captioning_{PRETRAIN_STAGES[0]}"},
                          lambda p: p.expander.data, run_expander_data)


def read_pairs(artifact: Path) -> pd.DataFrame:
    """The validated pairs table of an ``expander_data`` artifact (ArtifactError for another kind)."""
    read_manifest(artifact, kind="expander_data")
    return read_table(Path(artifact) / EXPANDER_PAIRS_FILE, ExpanderPairs)
