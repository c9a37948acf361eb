"""The row cache behind per-image reuse: rows by (item key, config slice), whole parts, damage skipped."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from krea2_core.row_cache import COMPUTED_IN, KEY, RowCache, item_key


def test_rows_are_found_by_key_under_their_config_slice_only(tmp_path: Path) -> None:
    cache = RowCache(tmp_path, "captions", {"model": "a"})
    assert cache.lookup(["x"]).empty and cache.lookup([]).empty  # nothing stored yet
    assert cache.add(pd.DataFrame({KEY: ["x", "y"], "text": ["one", "two"]}), "run-1") == 2
    assert cache.add(pd.DataFrame({KEY: ["y", "z"], "text": ["two again", "three"]}), "run-2") == 2
    found = cache.lookup(["y", "z", "missing"]).set_index(KEY)
    assert found.loc["y", "text"] == "two" and found.loc["y", COMPUTED_IN] == "run-1"  # the earliest part wins
    assert found.loc["z", COMPUTED_IN] == "run-2" and "missing" not in found.index
    assert RowCache(tmp_path, "captions", {"model": "b"}).lookup(["x"]).empty  # another slice
    assert RowCache(tmp_path, "captions", {"model": "a"}, version=2).lookup(["x"]).empty  # another code version
    assert RowCache(tmp_path, "ocr", {"model": "a"}).lookup(["x"]).empty  # another kind
    assert (cache.path / "config.json").is_file() and not list(cache.path.glob(".*"))  # no temporary left


def test_a_damaged_part_is_skipped_and_its_rows_computed_again(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = RowCache(tmp_path, "captions", {"model": "a"})
    cache.add(pd.DataFrame({KEY: ["x"], "text": ["one"]}), "run-1")
    cache.add(pd.DataFrame({KEY: ["y"], "text": ["two"]}), "run-2")
    first = sorted(cache.path.glob("part-*.parquet"))[0]
    first.write_bytes(first.read_bytes()[:20])
    assert cache.lookup(["x", "y"])[KEY].tolist() == ["y"]
    assert "skipping damaged row cache part" in capsys.readouterr().err


def test_bad_rows_are_refused(tmp_path: Path) -> None:
    cache = RowCache(tmp_path, "captions", {})
    with pytest.raises(ValueError, match="need a 'key' column"):
        cache.add(pd.DataFrame({"text": ["one"]}), "run")
    assert cache.add(pd.DataFrame({KEY: []}), "run") == 0 and not cache.path.exists()


def test_item_keys_digest_every_part() -> None:
    assert item_key("md5", "") != item_key("md5", "caption") != item_key("md5\0caption")
    assert item_key("a", "b") == item_key("a", "b") and len(item_key("a")) == 32
