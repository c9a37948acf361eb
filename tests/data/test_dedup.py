import faiss
import numpy as np
import pytest

from krea2_core.data.dedup import find_duplicates, keep_order, near_pairs, source_rank


def _planted_codes(n: int, seed: int = 0) -> np.ndarray:
    """Random 144-bit codes plus copies of the first tenth with 0..29 flipped bits."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, 18), dtype=np.uint8)
    copies = np.unpackbits(codes[: n // 10], axis=1)
    for row in copies:
        row[rng.choice(144, rng.integers(0, 30), replace=False)] ^= 1
    return np.vstack([codes, np.packbits(copies, axis=1)])


def _brute_force(codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    limits, _, found = index.range_search(codes, radius + 1)
    queries = np.repeat(np.arange(len(codes)), np.diff(limits.astype(np.int64)))
    return {(int(a), int(b)) for a, b in zip(queries, found, strict=True) if a < b}


@pytest.mark.parametrize("radius", [0, 5, 12, 16, 25])
def test_multi_index_hashing_finds_exactly_the_brute_force_pairs(radius: int) -> None:
    codes = _planted_codes(6000)  # above the brute-force cut-off, so the multi-hash index is used
    i, j = near_pairs(codes, radius)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute_force(codes, radius)


def test_keep_order_prefers_pixels_then_bytes_then_id() -> None:
    order = keep_order(np.array([100, 400, 400, 400]), np.array([9, 5, 7, 7]), np.array(["a", "d", "c", "b"]))
    assert order.tolist() == [3, 2, 1, 0]  # b (400px, 7B) < c (same, larger id) < d (5B) < a (100px)


def _codes(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.uint8)


def test_near_duplicates_need_close_colour_too_and_exact_copies_need_nothing() -> None:
    phash = _codes([0, 0], [0, 1], [0, 3], [255, 255], [7, 7])
    colour = _codes([0], [1], [255], [0], [9])  # row 2 has the same structure as row 0 but other colours
    md5 = np.array(["x", "y", "z", "w", "x"])  # row 4 is a byte copy of row 0 despite its hashes
    decision = find_duplicates(md5, phash, colour, order=np.arange(5), max_phash_distance=2,
                               max_colorhash_distance=2)
    assert decision.dup_of.tolist() == [-1, 0, -1, -1, 0]
    assert decision.exact.tolist() == [False, False, False, False, True]


def test_chains_do_not_drop_through_a_dropped_row() -> None:
    # A ~ B ~ C but A is far from C: keeping A drops B, and C survives (nothing links it to A)
    phash = _codes([0b00000000], [0b00000011], [0b00001111])
    colour = _codes([0], [0], [0])
    decision = find_duplicates(np.array(["a", "b", "c"]), phash, colour, order=np.arange(3),
                               max_phash_distance=2, max_colorhash_distance=0)
    assert decision.dup_of.tolist() == [-1, 0, -1]


def test_dedup_is_deterministic_under_row_permutation() -> None:
    rng = np.random.default_rng(1)
    phash = _planted_codes(500, seed=1)
    colour = np.zeros((len(phash), 9), np.uint8)
    ids = np.array([f"id{k:04d}" for k in range(len(phash))])
    pixels = rng.integers(1, 4, len(phash)) * 1000
    sizes = rng.integers(1, 3, len(phash))
    md5 = ids.copy()

    def groups(perm: np.ndarray) -> dict[str, str]:
        d = find_duplicates(md5[perm], phash[perm], colour[perm], keep_order(pixels[perm], sizes[perm], ids[perm]), 12, 0)
        return {ids[perm][k]: ids[perm][d.dup_of[k]] for k in np.flatnonzero(d.dup_of >= 0)}

    baseline = groups(np.arange(len(phash)))
    assert baseline  # the planted copies are found
    assert groups(rng.permutation(len(phash))) == baseline


def test_a_source_rank_decides_between_duplicates_of_one_size_before_file_size() -> None:
    pixels, n_bytes, ids = np.array([400, 400, 900]), np.array([9, 5, 1]), np.array(["a", "b", "c"])
    assert keep_order(pixels, n_bytes, ids).tolist() == [2, 0, 1]  # pixels, then the larger file
    rank = source_rank(np.array(["mirror", "originals", "mirror"]), ["originals"])
    assert rank.tolist() == [1, 0, 1]
    assert keep_order(pixels, n_bytes, ids, rank).tolist() == [2, 1, 0]  # the original beats a larger re-save
    assert source_rank(np.array(["x", "y"]), []).tolist() == [0, 0]


def test_selection_keeps_the_original_over_a_larger_resave_when_its_source_is_preferred(tmp_path) -> None:  # noqa: ANN001
    import io

    import pandas as pd
    from PIL import Image

    from krea2_core.curation.config import AnalysisConfig, DedupConfig, ParallelConfig, StageFilters
    from krea2_core.data.curation import score_pool, select_stage

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((96, 128, 3)) * 60 + np.linspace(0, 180, 128)[None, :, None]).astype(np.uint8))
    original, resave = io.BytesIO(), io.BytesIO()
    image.save(original, format="JPEG", quality=80)
    Image.open(io.BytesIO(original.getvalue())).save(resave, format="JPEG", quality=98)  # larger file, same pixels
    assert len(resave.getvalue()) > len(original.getvalue())
    pool = pd.DataFrame({"id": ["orig", "copy"], "uri": ["a.jpg", "b.jpg"], "source": ["originals", "mirror"],
                         "format": "JPEG", "exif": "{}", "bytes": [original.getvalue(), resave.getvalue()]})
    scores = score_pool(pool, AnalysisConfig(), ParallelConfig(backend="serial"))
    filters = StageFilters(min_side=32)

    def kept(dedup: DedupConfig) -> list[str]:
        verdicts = select_stage(pool, scores, "256", filters, dedup)
        return verdicts.loc[verdicts["kept"], "id"].tolist()

    assert kept(DedupConfig()) == ["copy"]  # by default the larger file wins
    assert kept(DedupConfig(source_priority=["originals"])) == ["orig"]
