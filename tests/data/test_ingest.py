import io
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from krea2_core.data.ingest import build_raw_pool, list_folder, read_uri_table
from krea2_core.data.schemas import RawPool, SchemaError, validate
from tests.conftest import SERIAL


def _png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_folder_listing_keeps_every_file_but_hidden_ones_with_stable_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    listing = list_folder(tmp_path, source="s")
    assert sorted(Path(u).name for u in listing["uri"]) == ["a.png", "notes.txt"]
    assert listing["id"].tolist() == list_folder(tmp_path, source="s")["id"].tolist()

    pool = validate(build_raw_pool(listing, SERIAL), RawPool, "pool")
    image, text = pool.sort_values("uri").itertuples()
    assert (image.width, image.height, image.format) == (64, 48, "PNG") and pd.isna(image.probe_error)
    assert pd.isna(text.width) and "not_an_image" in text.probe_error


def test_uri_table_with_inline_bytes_and_missing_files(tmp_path: Path) -> None:
    table = tmp_path / "uris.parquet"
    pd.DataFrame({"uri": ["mem://one", str(tmp_path / "gone.jpg")], "bytes": [_png(32, 32), None]}).to_parquet(table)
    pool = validate(build_raw_pool(read_uri_table(table), SERIAL), RawPool, "pool")
    assert pool.loc[0, "width"] == 32 and pool.loc[0, "source"] == "uris"
    assert "unreadable" in pool.loc[1, "probe_error"]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"path": ["a.jpg"]}), "needs a 'uri' column"),
        (pd.DataFrame({"uri": ["a.jpg", None, ""]}), "rows [1, 2] have an empty uri"),
        (pd.DataFrame({"uri": ["a.jpg", "b.jpg"], "id": ["x", "x"]}), "duplicate ids ['x']"),
        (pd.DataFrame({"uri": pd.Series([], dtype=str)}), "the URI table has no rows"),
    ],
)
def test_bad_uri_tables_get_clear_errors(tmp_path: Path, frame: pd.DataFrame, message: str) -> None:
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path)
    with pytest.raises(SchemaError) as err:
        read_uri_table(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="URI table not found"):
        read_uri_table(tmp_path / "nope.parquet")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no files"):
        list_folder(tmp_path / "empty")


def test_raw_pool_schema_names_the_broken_column() -> None:
    frame = pd.DataFrame({"id": ["a", "a"], "uri": ["x", "y"], "source": "s", "n_bytes": [1, -1], "width": [1, 1],
                          "height": [1, 1], "format": ["PNG", "PNG"], "exif": "{}", "probe_error": None, "bytes": None})
    with pytest.raises(SchemaError) as err:
        validate(frame, RawPool, "raw_pool.parquet")
    assert "raw_pool.parquet" in str(err.value) and "n_bytes" in str(err.value) and "id" in str(err.value)


def test_a_file_name_that_is_not_utf8_gets_its_row_and_is_read(tmp_path: Path) -> None:
    os.makedirs(tmp_path / "pool")
    with open(os.fsencode(tmp_path / "pool") + b"/caf\xe9.png", "wb") as f:  # Latin-1 bytes, invalid UTF-8
        f.write(_png())
    (tmp_path / "pool" / "b.png").write_bytes(_png())
    listing = list_folder(tmp_path / "pool", source="s")
    assert listing["id"].tolist() == list_folder(tmp_path / "pool", source="s")["id"].tolist()  # stable
    assert listing["id"].nunique() == 2
    odd = listing["uri"][listing["uri"].str.startswith("file://")].tolist()
    assert len(odd) == 1 and odd[0].endswith("/caf%E9.png")  # the original bytes, percent-encoded
    pool = validate(build_raw_pool(listing, SERIAL), RawPool, "pool")
    assert pool["probe_error"].isna().all() and set(pool["width"]) == {64}  # both headers read
    pool.to_parquet(tmp_path / "raw_pool.parquet")  # a table holds it


def test_entries_that_are_not_files_get_a_not_a_file_verdict(tmp_path: Path) -> None:
    import socket

    from krea2_core.curation.config import AnalysisConfig
    from krea2_core.data.curation import score_pool

    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    (pool_dir / "a.png").write_bytes(_png())
    os.mkfifo(pool_dir / "pipe.png")  # opening it would block: it must not be opened
    (pool_dir / "gone.png").symlink_to(pool_dir / "deleted.png")
    (pool_dir / "link.png").symlink_to(pool_dir / "a.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(pool_dir / "s.sock"))
    try:
        listing = list_folder(pool_dir, source="s")
        pool = validate(build_raw_pool(listing, SERIAL), RawPool, "pool").set_index(
            listing["uri"].map(lambda uri: Path(uri).name))
        scores = score_pool(pool.reset_index(drop=True), AnalysisConfig(), SERIAL).set_index(pool.index)
    finally:
        server.close()
    assert sorted(pool.index) == ["a.png", "gone.png", "link.png", "pipe.png", "s.sock"]
    assert pool.loc["pipe.png", "probe_error"] == f"not_a_file: {pool_dir / 'pipe.png'}: a FIFO"
    assert pool.loc["s.sock", "probe_error"] == f"not_a_file: {pool_dir / 's.sock'}: a socket"
    assert pool.loc["gone.png", "probe_error"] == f"not_a_file: {pool_dir / 'gone.png'}: a broken symbolic link"
    assert pool.loc[["a.png", "link.png"], "probe_error"].isna().all()
    assert scores["error_reason"].fillna("read").to_dict() == {
        "a.png": "read", "gone.png": "not_a_file", "link.png": "read", "pipe.png": "not_a_file", "s.sock": "not_a_file"}


def test_a_server_that_does_not_answer_is_unreachable_not_a_broken_file(tmp_path: Path) -> None:
    import http.server
    import socket
    import threading

    from krea2_core.curation.config import AnalysisConfig
    from krea2_core.data.curation import score_pool

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    table = tmp_path / "uris.parquet"
    pd.DataFrame({"uri": [f"http://127.0.0.1:{closed}/a.png", f"http://127.0.0.1:{server.server_port}/missing.png"]}
                 ).to_parquet(table)
    try:
        pool = validate(build_raw_pool(read_uri_table(table), SERIAL), RawPool, "pool")
        scores = score_pool(pool, AnalysisConfig(), SERIAL)
    finally:
        server.shutdown()
    assert pool.loc[0, "probe_error"].startswith(f"unreachable: http://127.0.0.1:{closed}/a.png: no answer after 3 tries")
    assert pool.loc[1, "probe_error"].startswith("unreadable: FileNotFoundError")
    assert scores["error_reason"].tolist() == ["unreachable", "broken_file"]


def test_a_source_digest_changes_with_what_the_source_holds(tmp_path: Path) -> None:
    from krea2_core.data.ingest import source_digest

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"a")
    (folder / "sub" / "b.png").write_bytes(b"b")
    before = source_digest(folder)
    assert source_digest(folder) == before
    (folder / "c.png").write_bytes(b"c")  # an image added
    added = source_digest(folder)
    assert added != before
    os.utime(folder / "a.png", ns=(1, 1))  # an image rewritten (its modification time moves)
    assert source_digest(folder) != added
    table = tmp_path / "uris.parquet"
    table.write_bytes(b"one")
    first = source_digest(table)
    table.write_bytes(b"two")
    assert source_digest(table) != first
