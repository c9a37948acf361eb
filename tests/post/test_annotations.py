"""Calibration pairs from annotation sets: human sets (a folder with the table and its images; every bad row
recorded, schema errors raised, the table's content in the cache key) and the simulated annotator of the tiny
preset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from krea2_core.artifacts import read_manifest, to_plain
from krea2_core.data.schemas import Annotations, SchemaError, Skipped, read_table
from krea2_core.post.annotations import (ANNOTATED_IMAGES_DIR, TABLE_FILE, AnnotationSettings, annotation_settings,
                                         load_annotations, run_annotation_pairs, simulate_annotations,
                                         simulated_choices, table_digest)
from krea2_core.post.pairs import SKIPPED_FILE, read_pairs
from krea2_core.presets import preset

from ._checkpoints import RESOLUTION, BrightnessOracle, preference_config, publish_checkpoints, simulated_annotations


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def checkpoints(root: Path) -> dict[str, Path]:
    policy, previous = publish_checkpoints(root)
    return {"policy": policy, "previous": previous}


def _image(path: Path, seed: int, side: int = RESOLUTION) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _png(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _table(folder: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """An annotation set: ``folder`` with TABLE_FILE of rows of (pair_id, image_a, image_b, choice); returns
    ``folder``."""
    frame = pd.DataFrame([{"pair_id": pid, "prompt": f"prompt of {pid}", "image_a": a, "image_b": b,
                           "choice": choice, "annotator": "alice"} for pid, a, b, choice in rows])
    frame.to_parquet(folder / TABLE_FILE, index=False)
    return folder


def _human(folder: Path) -> AnnotationSettings:
    """The settings of the human annotation set ``folder``: its table's digest."""
    return AnnotationSettings(resolution=RESOLUTION, table_sha256=table_digest(folder / TABLE_FILE))


@pytest.fixture
def human_set(tmp_path: Path) -> Path:
    """An annotation set folder: TABLE_FILE and the images it names."""
    img = tmp_path / "img"
    for i in range(4):
        _image(img / f"good{i}.png", i)
    _image(img / "small.png", 10, side=16)
    Image.open(img / "good0.png").save(img / "good0_again.png", compress_level=1)  # other bytes, same pixels
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return _table(tmp_path, [
        ("choose-a", "img/good0.png", "img/good1.png", "a"),
        ("choose-b", str(img / "good2.png"), "img/good3.png", "b"),  # absolute paths work too
        ("missing", "img/good0.png", "img/nowhere.png", "a"),
        ("unreadable", "img/broken.png", "img/good1.png", "b"),
        ("identical-file", "img/good1.png", "img/good1.png", "a"),
        ("identical-pixels", "img/good0.png", "img/good0_again.png", "b"),
        ("small", "img/good0.png", "img/small.png", "a"),
        ("tie", "img/good2.png", "img/good3.png", "tie"),
    ])


def test_human_table_pairs_follow_the_choice_and_bad_rows_are_recorded(human_set: Path) -> None:
    pairs, skipped = load_annotations(human_set / TABLE_FILE, RESOLUTION)
    img = human_set / "img"
    assert list(pairs["pair_id"]) == ["choose-a", "choose-b"]
    a, b = pairs.set_index("pair_id").loc["choose-a"], pairs.set_index("pair_id").loc["choose-b"]
    assert (a["winner"], a["loser"]) == (_png(img / "good0.png"), _png(img / "good1.png"))
    assert (b["winner"], b["loser"]) == (_png(img / "good3.png"), _png(img / "good2.png"))
    assert (a["winner_source"], b["winner_source"]) == ("a:good0.png", "b:good3.png")
    assert (pairs["origin"] == "human").all() and not pairs["on_policy"].any()
    assert pairs["winner_score"].isna().all() and (pairs["rubric"] == "[]").all()
    reasons = dict(zip(skipped["pair_id"], skipped["reason"], strict=True))
    assert reasons == {"missing": "missing_image", "unreadable": "unreadable_image", "identical-file": "identical",
                       "identical-pixels": "identical", "small": "mismatched_resolution", "tie": "tie"}
    details = dict(zip(skipped["pair_id"], skipped["detail"], strict=True))
    assert "nowhere.png" in details["missing"] and "broken.png" in details["unreadable"]
    assert "16x16" in details["small"] and f"expected {RESOLUTION}x{RESOLUTION}" in details["small"]
    # at another resolution every row that got that far is mismatched
    _, at_64 = load_annotations(human_set / TABLE_FILE, 64)
    assert set(at_64.set_index("pair_id").loc[["choose-a", "choose-b", "tie"], "reason"]) == {"mismatched_resolution"}


def test_schema_violation_names_the_file_and_column_and_writes_nothing(tmp_path: Path, root: Path,
                                                                        checkpoints: dict[str, Path]) -> None:
    _image(tmp_path / "a.png", 0)
    _image(tmp_path / "b.png", 1)
    folder = _table(tmp_path, [("p0", "a.png", "b.png", "a"), ("p1", "a.png", "b.png", "maybe")])
    with pytest.raises(SchemaError, match=r"(?s)annotations\.parquet.*Annotations.*choice.*maybe"):
        load_annotations(folder / TABLE_FILE, RESOLUTION)
    before = set((root / "artifacts").glob("*/*"))
    with pytest.raises(SchemaError, match="choice"):  # making the settings checks the table, before anything runs
        annotation_settings(preset("tiny"), folder)
    with pytest.raises(SchemaError, match="choice"):  # and so does the stage, whatever settings it is given
        run_annotation_pairs(checkpoints, AnnotationSettings(resolution=RESOLUTION, table_sha256="0" * 64),
                             annotations=folder, root=root)
    assert set((root / "artifacts").glob("*/*")) == before


def test_human_stage_publishes_pairs_keyed_by_the_table_content(human_set: Path, root: Path,
                                                                 checkpoints: dict[str, Path]) -> None:
    settings = _human(human_set)
    out = run_annotation_pairs(checkpoints, settings, annotations=human_set, root=root)
    manifest = read_manifest(out)
    assert manifest.kind == "preference_pairs" and manifest.inputs == {}  # human labels need no checkpoint
    assert manifest.counts == {"rows": 8, "pairs": 2, "simulated": 0, "skipped.identical": 2, "skipped.tie": 1,
                               "skipped.missing_image": 1, "skipped.unreadable_image": 1,
                               "skipped.mismatched_resolution": 1}
    assert len(read_pairs(out)) == 2 and len(read_table(out / SKIPPED_FILE, Skipped)) == 6
    assert run_annotation_pairs(checkpoints, _human(human_set), annotations=human_set, root=root) == out
    _image(human_set / "img" / "good3.png", 99)  # same table file, one image replaced
    with pytest.raises(ValueError, match="changed since its settings were made"):  # the old key is stale
        run_annotation_pairs(checkpoints, settings, annotations=human_set, root=root)
    again = run_annotation_pairs(checkpoints, _human(human_set), annotations=human_set, root=root)
    assert again != out


def test_no_usable_annotation_is_a_clear_error(tmp_path: Path, root: Path, checkpoints: dict[str, Path]) -> None:
    _image(tmp_path / "a.png", 0)
    folder = _table(tmp_path, [("p0", "a.png", "a.png", "a"), ("p1", "a.png", "gone.png", "b")])
    with pytest.raises(ValueError, match=r"no usable preference pair.*'identical': 1.*'missing_image': 1"):
        run_annotation_pairs(checkpoints, _human(folder), annotations=folder, root=root)


def test_simulated_annotator_flips_at_the_label_noise_rate() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(4000), rng.random(4000)
    choices = np.array(simulated_choices(a, b, 0.05, 0.2, seed=3))
    ties = np.abs(a - b) < 0.05
    assert (choices[ties] == "tie").all()
    flipped = choices[~ties] != np.where(a > b, "a", "b")[~ties]
    assert abs(flipped.mean() - 0.2) < 0.02
    assert list(choices) == simulated_choices(a, b, 0.05, 0.2, seed=3)
    assert (np.array(simulated_choices(a, b, 0.05, 0.0, seed=3))[~ties] == np.where(a > b, "a", "b")[~ties]).all()


def test_simulated_table_validates_and_respects_label_noise(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    simulated = simulated_annotations()  # 40 simulated annotations, label noise 0.2
    table = simulate_annotations(checkpoints["policy"], checkpoints["previous"], simulated, tmp_path,
                                 oracle=BrightnessOracle())
    frame = read_table(table, Annotations)
    assert table == tmp_path / TABLE_FILE and len(frame) == 40
    assert (frame["annotator"] == "simulated").all() and frame["pair_id"].str.startswith("simulated-").all()
    files = list(frame["image_a"]) + list(frame["image_b"])
    assert all((tmp_path / f).is_file() and f.startswith(f"{ANNOTATED_IMAGES_DIR}/simulated-") for f in files)
    policy_side = np.where(frame["image_a"].str.contains("-policy-"), "a", "b")
    assert (frame["image_a"].str.contains("-policy-") != frame["image_b"].str.contains("-policy-")).all()
    assert 0 < (policy_side == "a").sum() < 40  # sides are shuffled
    # the oracle always prefers the bright previous checkpoint: choosing the policy is label noise
    assert (frame["choice"] != "tie").all()
    noise = (frame["choice"] == policy_side).mean()
    assert 0.05 <= noise <= 0.4, noise


def test_simulated_stage_is_named_simulated(checkpoints: dict[str, Path], root: Path) -> None:
    settings = AnnotationSettings(resolution=RESOLUTION,
                                  simulated=simulated_annotations(preference_config(simulated=12)))
    out = run_annotation_pairs(checkpoints, settings, root=root, oracle=BrightnessOracle())
    manifest = read_manifest(out)
    pairs = read_pairs(out)
    assert (pairs["origin"] == "simulated").all() and pairs["pair_id"].str.startswith("simulated-").all()
    assert manifest.counts["simulated"] == 1 and manifest.counts["pairs"] == len(pairs) == 12
    assert set(manifest.inputs) == {"policy", "previous"}
    assert manifest.config == json.loads(json.dumps({"settings": to_plain(settings), "oracle": BrightnessOracle.name}))
    assert manifest.config["settings"]["simulated"]["n"] == 12 and manifest.config["settings"]["table_sha256"] == ""
    assert read_table(out / "simulated" / TABLE_FILE, Annotations)["annotator"].eq("simulated").all()
