"""The packed loader: any step replays bit for bit, rank slices add up to the single-rank batch, an epoch
reads every packed sample once, captions follow the ratios and dropout, bad input fails clearly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from krea2_core.data.loader import Batch, PackedLoader
from krea2_core.data.packing import INDEX_FILE, pack_stage

GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images in 3 buckets of 32x32-ish area, packed into 6 batches of 4 over 3 shards."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(80, 40)] * 8 + [(50, 50)] * 8 + [(40, 80)] * 8):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append((f"id{i:02d}", str(path), w, h))
    kept = pd.DataFrame(rows, columns=["id", "uri", "width", "height"])
    captions = kept[["id"]].assign(long="long " + kept["id"], medium="medium " + kept["id"], short="short " + kept["id"])
    out = tmp_path_factory.mktemp("packed")
    pack_stage(kept, captions, resolution=32, aspect_ratios=[0.5, 1.0, 2.0], multiple=8,
               global_batch=GLOBAL_BATCH, seed=0, out_dir=out, batches_per_shard=2)
    return out


def _loader(packed: Path, rank: int = 0, world_size: int = 1, **kwargs: object) -> PackedLoader:
    return PackedLoader(packed, rank=rank, world_size=world_size, **{"caption_ratios": (0.5, 0.25, 0.25),
                                                                      "caption_dropout": 0.25, "seed": 1, **kwargs})


def _same(a: Batch, b: Batch) -> bool:
    return (a.step == b.step and torch.equal(a.sample_index, b.sample_index) and a.ids == b.ids
            and torch.equal(a.pixels, b.pixels) and a.captions == b.captions)


def test_batches_hold_one_bucket_of_pixels_in_range(packed: Path) -> None:
    loader = _loader(packed)
    assert (loader.n_batches, loader.global_batch, loader.local_batch) == (6, 4, 4)
    sizes = set()
    for batch in (loader.batch(step) for step in range(loader.n_batches)):
        assert batch.pixels.dtype == torch.float32 and batch.pixels.shape[:2] == (4, 3)
        assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
        assert batch.sample_index.dtype == torch.int64 and len(batch.ids) == len(batch.captions) == 4
        sizes.add(tuple(batch.pixels.shape[2:]))
    assert sizes == {(48, 24), (32, 32), (24, 48)}  # (H, W) of the three buckets


def test_any_step_replays_bit_for_bit(packed: Path) -> None:
    first = _loader(packed)
    run = [first.batch(step) for step in range(14)]
    resumed = _loader(packed)  # a fresh process resuming at step 9, then jumping back
    assert _same(resumed.batch(9), run[9]) and _same(resumed.batch(3), run[3]) and _same(resumed.batch(9), run[9])
    it = resumed.iter_from(11)
    assert all(_same(next(it), run[step]) for step in (11, 12, 13))
    assert all(_same(a, b) for a, b in zip(itertools.islice(_loader(packed), 5), run[:5], strict=True))


def test_ranks_together_are_the_single_rank_batch(packed: Path) -> None:
    single = _loader(packed)
    ranks = [_loader(packed, rank=r, world_size=2) for r in range(2)]
    for step in (0, 5, 7):
        whole, parts = single.batch(step), [loader.batch(step) for loader in ranks]
        assert all(len(p.ids) == 2 for p in parts)
        assert torch.equal(torch.cat([p.pixels for p in parts]), whole.pixels)
        assert torch.equal(torch.cat([p.sample_index for p in parts]), whole.sample_index)
        assert sum((p.ids for p in parts), []) == whole.ids and sum((p.captions for p in parts), []) == whole.captions


def test_an_epoch_reads_every_packed_sample_once_and_repeats_the_order(packed: Path) -> None:
    loader = _loader(packed)
    n = loader.n_batches
    epochs = [[loader.batch(step) for step in range(e * n, (e + 1) * n)] for e in range(2)]
    indices = [torch.cat([b.sample_index for b in epoch]).tolist() for epoch in epochs]
    assert indices[0] == indices[1] == list(range(24))
    assert sorted(sum((b.ids for b in epochs[0]), [])) == [f"id{i:02d}" for i in range(24)]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(*epochs, strict=True))
    captions = [sum((b.captions for b in epoch), []) for epoch in epochs]
    assert captions[0] != captions[1]  # variants and dropout are drawn again each epoch


def test_captions_follow_ratios_and_dropout(packed: Path) -> None:
    def captions(**kwargs: object) -> list[str]:
        loader = _loader(packed, **kwargs)
        return [c for step in range(4 * loader.n_batches) for c in loader.batch(step).captions]

    assert all(c.startswith("long ") for c in captions(caption_ratios=(1.0, 0.0, 0.0), caption_dropout=0.0))
    assert all(c.startswith("short ") for c in captions(caption_ratios=(0.0, 0.0, 1.0), caption_dropout=0.0))
    assert captions(caption_dropout=1.0) == [""] * 96
    mixed = captions(caption_ratios=(0.5, 0.25, 0.25), caption_dropout=0.25)
    share = {kind: sum(c.startswith(kind) for c in mixed) / len(mixed) for kind in ("long", "medium", "short")}
    dropped = mixed.count("") / len(mixed)
    assert 0.1 < dropped < 0.4 and 0.25 < share["long"] < 0.55 and share["medium"] > 0.05 and share["short"] > 0.05


def test_bad_inputs_fail_clearly(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        _loader(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"global batch \(4\) .* divisible by the world size \(3\)"):
        _loader(packed, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank must be in"):
        _loader(packed, rank=2, world_size=2)
    with pytest.raises(ValueError, match="sum to 1"):
        _loader(packed, caption_ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="caption_dropout"):
        _loader(packed, caption_dropout=1.5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        _loader(packed).batch(-1)


def test_a_shard_that_does_not_match_its_index_is_reported(packed: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "shards").symlink_to(packed / "shards")
    index = json.loads((packed / INDEX_FILE).read_text())
    index["shards"][1]["first_batch"] = 3  # shard 1 really starts at batch 2
    (copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="corrupt"):
        _loader(copy).batch(3)
