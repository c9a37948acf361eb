from pathlib import Path

import pytest

from krea2_core.world.pool import real_image_files


def test_a_small_limit_draws_evenly_from_every_folder(tmp_path: Path) -> None:
    for folder, n in (("a", 6), ("b", 3)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            (tmp_path / folder / f"{i}.png").write_bytes(b"png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert [f"{p.parent.name}/{p.name}" for p in real_image_files(dirs, 3)] == ["a/0.png", "a/4.png", "b/2.png"]
    assert len(real_image_files(dirs, 9)) == len(real_image_files(dirs, 100)) == 9
    assert real_image_files(dirs, 0) == []
    with pytest.raises(FileNotFoundError, match="real image folder .* is missing"):
        real_image_files([str(tmp_path / "gone")], 3)
