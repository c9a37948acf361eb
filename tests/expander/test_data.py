"""Expander SFT data: style classification, weighted sampling, photographic bias, writer fallbacks, split, the
stage's artifact, and one real SmolLM2 run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from krea2_core.artifacts import ArtifactError, publish, read_manifest, staged_dir
from krea2_core.captioning.llm import Generated
from krea2_core.captioning.stages import CAPTIONS_FILE
from krea2_core.data.schemas import ExpanderPairs, SchemaError, validate
from krea2_core.expander import data
from krea2_core.expander.config import ExpanderDataConfig
from krea2_core.text import content_words

ART = "A watercolor painting of a red fox number {} sitting in tall green grass under a pale morning sky."
PHOTO = "A photo of a brown dog number {} running along a sandy beach while waves roll in at sunset."
OTHER = "A red circle number {} and a blue square on a white background, the circle above the square."
CONFIG = ExpanderDataConfig(n_pairs=8, user_words=8, thinking_words=30, batch_size=4, seed=3)


class FakeWriter:
    """Deterministic writer; markers in the caption choose the behaviour: EMPTY (empty answer), RAISE (the
    prompt fails), ECHO (repeats the caption), COPY (the caption's content words), LONGUSER (a 10-word request),
    NOTHINK (empty thinking), TAGS (thinking wrapped in think tags)."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(self, messages_batch: list, max_new_tokens: int) -> list[Generated]:
        self.batches.append(len(messages_batch))
        return [Generated(self._answer(m[0]["content"], m[1]["content"]), truncated=False) for m in messages_batch]

    @staticmethod
    def _answer(system: str, request: str) -> str:
        if system != data._USER_SYSTEM:
            if "NOTHINK" in request:
                return ""
            return "<think>the user wants a picture</think>" if "TAGS" in request else "They want it; add colours."
        caption = request.split("\n\n", 1)[1]
        if "RAISE" in caption:
            raise RuntimeError("writer crashed")
        if "EMPTY" in caption:
            return "  "
        if "ECHO" in caption:
            return caption
        if "COPY" in caption:
            return " ".join(w for w in content_words(caption) if w)
        if "LONGUSER" in caption:
            return "please " * 10
        return f"Can you make a {max(caption.split(), key=len)}?"


def captions_table(longs: list[str], **columns: list) -> pd.DataFrame:
    n = len(longs)
    base = {"id": [f"img{i:03d}" for i in range(n)], "ocr_text": [""] * n, "ocr_lines": ["[]"] * n,
            "text_density": [0.0] * n, "long": longs, "medium": longs, "short": [f"short {i}" for i in range(n)],
            "tags": [""] * n, "conversational": [f"could you make picture {i} for me please now" for i in range(n)],
            "source": ["text_llm"] * n, "flags": [""] * n, "error": [None] * n}
    return pd.DataFrame(base | columns)


def captions_artifact(table: pd.DataFrame, root: Path) -> Path:
    """A captions artifact holding ``table`` as is (not validated, so broken tables can be tested)."""
    out = root / "captions"
    with staged_dir(out) as staging:
        table.to_parquet(staging / CAPTIONS_FILE)
        publish(staging, out, kind="captions")
    return out


def mixed(n_art: int, n_photo: int, n_other: int) -> pd.DataFrame:
    return captions_table([ART.format(i) for i in range(n_art)] + [PHOTO.format(i) for i in range(n_photo)]
                          + [OTHER.format(i) for i in range(n_other)])


def test_style_is_a_whole_word_case_insensitive_match_and_art_wins() -> None:
    assert data.classify_style("A WATERCOLOR of a fox", CONFIG) == "artistic"
    assert data.classify_style("A photo of a dog.", CONFIG) == "photo"
    assert data.classify_style("A photo of an oil painting", CONFIG) == "artistic"  # both: artistic wins
    assert data.classify_style("A photographer with an artful smile, photos everywhere", CONFIG) == "other"
    assert data.classify_style("a red square", CONFIG) == "other"
    assert data.classify_style("A photo", ExpanderDataConfig(photo_words=[])) == "other"


def test_usable_rows_leave_out_errors_empty_captions_and_no_source() -> None:
    table = captions_table([ART.format(0), "  ", PHOTO.format(1), OTHER.format(2)],
                           source=["text_llm", "vlm", "none", "scene_graph"], error=[None, None, None, "boom"])
    assert data.usable_captions(table, CONFIG)["id"].tolist() == ["img000"]
    with pytest.raises(ValueError, match="none of its 3 rows is usable"):
        data.usable_captions(table.iloc[1:], CONFIG, "captions.parquet")


def test_sampling_oversamples_art_and_is_capped_at_the_usable_rows() -> None:
    usable = data.usable_captions(mixed(20, 0, 80), CONFIG)

    def artistic(weight: float) -> int:
        config = ExpanderDataConfig(n_pairs=20, artistic_weight=weight, seed=5)
        return int(data.sample_captions(usable, config)["style"].eq("artistic").sum())

    assert artistic(1.0) <= 8 < 12 <= artistic(20.0)  # ~4 expected with weight 1, ~17 with weight 20
    everything = data.sample_captions(usable, ExpanderDataConfig(n_pairs=500))
    assert len(everything) == 100 and everything["id"].is_unique


def test_photo_medium_goes_to_the_configured_share_of_photos_only() -> None:
    styles = ["photo"] * 10 + ["other"] * 5 + ["artistic"] * 5
    media = data.photo_media(styles, 0.5, seed=1)
    assert sum(bool(m) for m in media) == 5
    assert all(m in data.PHOTO_MEDIA for m, s in zip(media, styles, strict=True) if s == "photo" and m)
    assert not any(media[10:])
    assert sum(bool(m) for m in data.photo_media(styles, 1.0, seed=1)) == 10
    assert not any(data.photo_media(styles, 0.0, seed=1))

    config = ExpanderDataConfig(n_pairs=10, photo_bias=0.5, batch_size=4)
    pairs = data.write_pairs(data.sample_captions(data.usable_captions(mixed(0, 6, 4), config), config), config,
                             FakeWriter())
    biased = pairs[pairs["photo_medium"]]
    assert len(biased) == 3 and biased["style"].eq("photo").all()
    assert all(e.split(".")[0] + "." in data.PHOTO_MEDIA and PHOTO.format("")[:20] in e for e in biased["expansion"])
    assert pairs.loc[~pairs["photo_medium"], "expansion"].str.startswith(("A photo of", "A red circle")).all()


def test_every_fallback_is_taken_and_flagged() -> None:
    longs = [ART.format("plain"), ART.format("EMPTY"), ART.format("RAISE"), ART.format("ECHO"), ART.format("COPY"),
             ART.format("EMPTY twice"), ART.format("LONGUSER"), ART.format("NOTHINK"), ART.format("TAGS")]
    conversational = [f"could you make picture {i} for me please now" for i in range(len(longs))]
    conversational[5] = ""
    table = captions_table(longs, conversational=conversational)
    config = ExpanderDataConfig(n_pairs=20, user_words=6, thinking_words=16, batch_size=4)
    writer = FakeWriter()
    pairs = data.write_pairs(data.usable_captions(table, config), config, writer).set_index("id")
    validate(pairs.reset_index(), ExpanderPairs, "pairs")

    # user prompts in batches of 4; the first batch fails on its RAISE caption and is retried prompt by prompt
    assert writer.batches[:7] == [4, 1, 1, 1, 1, 4, 1]
    assert pairs.loc["img000", "user"] == "Can you make a watercolor?" and pairs.loc["img000", "flags"] == ""
    for row, flag in (("img001", "user_fallback"), ("img002", "user_fallback"), ("img003", "user_not_shorter"),
                      ("img004", "user_copy")):
        assert pairs.loc[row, "flags"] == flag
        assert pairs.loc[row, "user"] == f"could you make picture {int(row[-1])} for"  # conversational, 6 words
    assert pairs.loc["img005", "user"] == "short 5"  # no conversational variant: the short one
    assert pairs.loc["img006", "flags"] == "user_truncated" and len(pairs.loc["img006", "user"].split()) == 6
    assert pairs.loc["img007", "flags"] == "thinking_fallback"
    assert pairs.loc["img007", "thinking"] == ('Asked for "Can you make a watercolor?". Keeping that, the description '
                                               "adds: painting, red, fox, number")  # cut to 16 words
    assert pairs.loc["img008", "thinking"] == "the user wants a picture"  # think tags removed
    assert (pairs["expansion"] == table.set_index("id")["long"]).all()


def test_split_is_seeded_and_keeps_one_val_pair_when_asked() -> None:
    assert data.split_labels(20, 0.25, seed=1).count("val") == 5
    assert data.split_labels(2, 0.01, seed=1).count("val") == 1
    assert data.split_labels(1, 0.5, seed=1) == ["train"]
    assert data.split_labels(10, 0.0, seed=1) == ["train"] * 10
    assert data.split_labels(50, 0.2, seed=1) == data.split_labels(50, 0.2, seed=1)
    assert data.split_labels(50, 0.2, seed=1) != data.split_labels(50, 0.2, seed=2)


def test_pairs_schema_rejects_a_photographic_medium_on_a_non_photo() -> None:
    pairs = pd.DataFrame({"id": ["a"], "user": ["u"], "thinking": ["t"], "expansion": ["e"], "style": ["artistic"],
                          "photo_medium": [True], "split": ["train"], "flags": [""]})
    with pytest.raises(SchemaError, match="photo_medium_only_on_photos"):
        validate(pairs, ExpanderPairs, "pairs")


def test_stage_writes_a_reproducible_validated_artifact(isolated_outputs: Path) -> None:
    captions = captions_artifact(mixed(6, 6, 6).assign(source=["scene_graph"] * 18), isolated_outputs)
    config = ExpanderDataConfig(n_pairs=12, batch_size=4, val_fraction=0.25, seed=9)
    out = data.run_expander_data({"captions": captions}, config, llm=FakeWriter())

    manifest = read_manifest(out, kind="expander_data")
    pairs = data.read_pairs(out)
    assert len(pairs) == 12 and manifest.counts["pairs"] == 12 and manifest.counts["usable"] == 18
    assert manifest.counts["split.val"] == 3 == int(pairs["split"].eq("val").sum())
    assert sum(manifest.counts[f"style.{s}"] for s in data.STYLES) == 12
    assert manifest.counts["photo_medium"] == int(pairs["photo_medium"].sum()) > 0
    examples = json.loads((out / data.EXAMPLES_FILE).read_text())
    assert {e["style"] for e in examples} == set(pairs["style"]) and {"user", "thinking", "expansion"} <= set(examples[0])

    first = pairs.copy()
    assert data.run_expander_data({"captions": captions}, config, llm=FakeWriter()) == out
    assert read_manifest(out).digest == manifest.digest
    pd.testing.assert_frame_equal(data.read_pairs(out), first)
    with pytest.raises(ArtifactError, match="expected 'expander_data'"):
        data.read_pairs(captions)


def test_stage_names_the_missing_column_of_a_bad_captions_table(isolated_outputs: Path) -> None:
    captions = captions_artifact(mixed(2, 2, 2).drop(columns="conversational"), isolated_outputs)
    with pytest.raises(SchemaError, match="conversational"):
        data.run_expander_data({"captions": captions}, CONFIG, llm=FakeWriter())
    empty = captions_artifact(mixed(1, 1, 0).assign(source="none"), isolated_outputs / "other")
    with pytest.raises(ValueError, match="none of its 2 rows is usable"):
        data.run_expander_data({"captions": empty}, CONFIG, llm=FakeWriter())


def test_pair_stats_rates_and_words() -> None:
    pairs = pd.DataFrame({"id": ["a", "b"], "user": ["one two", "one two three four"], "thinking": ["t", "t t t"],
                          "expansion": ["e e e e", "e e"], "style": ["photo", "other"], "photo_medium": [True, False],
                          "split": ["train", "val"], "flags": ["user_copy,thinking_fallback", ""]})
    counts, metrics = data.pair_stats(pairs)
    assert counts["style.photo"] == 1 and counts["photo_medium"] == 1 and counts["flag.user_copy"] == 1
    assert metrics["fallback_rate.user"] == 0.5 == metrics["fallback_rate.thinking"]
    assert metrics["words.user"] == 3.0 and metrics["words.thinking"] == 2.0 and metrics["words.expansion"] == 3.0


@pytest.mark.slow
def test_smollm2_writes_user_prompts_shorter_than_the_captions() -> None:
    from krea2_core.captioning.llm import LocalChatLLM
    from krea2_core.world.captions import captions
    from krea2_core.world.scene import sample_scene

    rng = np.random.default_rng(0)
    longs = [captions(sample_scene(rng, 64, 64, max_shapes=3))["long"] for _ in range(4)]
    config = ExpanderDataConfig(n_pairs=4, max_new_tokens=40, batch_size=4, device="cpu")
    pairs = data.write_pairs(data.usable_captions(captions_table(longs), config), config,
                             LocalChatLLM.load(config.writer_model, "cpu"))
    written = pairs[~pairs["flags"].str.contains("user_fallback|user_not_shorter|user_copy")]
    assert len(written) >= 2  # the writer's own prompts, not fallbacks, for most captions
    assert all(len(u.split()) < len(e.split()) for u, e in zip(written["user"], written["expansion"], strict=True))
    assert pairs["thinking"].str.len().gt(0).all()


def test_a_user_prompt_asking_for_what_the_caption_lacks_is_unfaithful() -> None:
    caption = ('An image of two red circles and a blue square on a grey sand background. The word "SALE" is written '
               'in dark letters.')
    assert not data.invents_request("can you make two red circles please", caption)
    assert not data.invents_request('draw a blue square with the word "sale"', caption)
    assert data.invents_request("three red circles", caption)  # a count the caption contradicts
    assert data.invents_request("a green triangle", caption)  # a shape it does not show
    assert data.invents_request('a sign that says "OPEN"', caption)  # another word
    assert data.invents_request("a person's favorite color and a face", caption)  # mostly invented content
    row = {"long": caption, "conversational": "could you make two red circles", "short": "two red circles"}
    user, flags = data.finish_user(Generated("a green triangle on the beach", truncated=False), row, limit=8)
    assert (user, flags) == ("could you make two red circles", ["user_unfaithful"])
