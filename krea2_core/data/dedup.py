"""Exact and near-duplicate removal without comparing all pairs.

Candidates come from multi-index hashing (Norouzi et al., "Fast Search in Hamming Space with Multi-Index
Hashing"): the pHash is cut into ``nhash`` substrings and each row probes its substrings' buckets with up to
``nflip`` flipped bits. By pigeonhole, two codes within distance ``r`` agree on some substring up to ``nflip`` bits
whenever ``r <= nhash * (nflip + 1) - 1``, so choosing ``nhash`` from the radius makes the search exact (a test checks
it against brute force) while each row only touches a few buckets instead of all n rows. ``nflip`` is chosen by a
cost model: probes per row times expected bucket occupancy.
The buckets are direct-addressed arrays probed for all rows at once, not faiss' ``IndexBinaryMultiHash``: its
hash-map probes cost ~400 ns each at 100k rows and made the search 2.6x slower, growing ~n^1.9 where this grows
~n^1.6 (docs/results.md). The bits are dealt to the substrings in a fixed shuffled order: neighbouring pHash bits
(adjacent DCT frequencies) are skewed and correlated, which crowded the buckets to 6x the uniform occupancy; shuffled,
1.8x. A Hamming distance does not depend on the order of the bits, so the search stays exact.
Candidate pairs must then also be close in colorhash, which separates same-layout/other-colour images
that pHash alone confuses (the report's reason to combine them).

Keep rule (deterministic): within duplicates, keep the largest image (pixels), then the larger file,
then the smaller id. Rows are visited in that order; a kept row claims its unclaimed neighbours, which
record it as ``dup_of``. Neighbours of a dropped row are not claimed through it, so near-duplicate
chains (A~B~C with A far from C) cannot drop C for A.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import faiss
import numpy as np

from krea2_core.data.hashing import hamming

_BRUTE_FORCE_BELOW = 4096  # rows; below this a flat popcount scan is faster than hashing


@dataclass(frozen=True)
class DupDecision:
    dup_of: np.ndarray  # (n,) int index of the kept row, -1 where the row is kept
    exact: np.ndarray  # (n,) bool: dropped as a byte-identical copy (same md5)


def near_pairs(phash_codes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with pHash Hamming distance <= max_distance, as two index arrays."""
    n, nbytes = phash_codes.shape
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    plan = _multihash_plan(n, nbytes * 8, max_distance)
    if plan is None:
        return _flat_pairs(phash_codes, max_distance)
    return _multihash_pairs(phash_codes, max_distance, *plan)


def _flat_pairs(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    limits, _, neighbours = index.range_search(codes, radius + 1)  # faiss radius is strict
    queries = np.repeat(np.arange(len(codes)), np.diff(limits.astype(np.int64)))
    upper = queries < neighbours
    return queries[upper].astype(np.int64), neighbours[upper].astype(np.int64)


_MAX_SUB_BITS = 20  # a substring's bucket offsets are a 2^bits array: 8 MiB at 20 bits
_CANDIDATES_PER_BLOCK = 1 << 22  # candidate pairs verified at once (bounds memory: ~200 MiB)


def _multihash_plan(n: int, bits: int, radius: int) -> tuple[int, int, int] | None:
    """(nhash, substring bits, nflip) exact for ``radius`` with the fewest expected candidate visits."""
    if n < _BRUTE_FORCE_BELOW:
        return None
    best, best_cost = None, float(n)  # brute force visits every row
    for nflip in range(4):
        nhash = math.ceil((radius + 1) / (nflip + 1))
        sub_bits = bits // nhash
        if not 1 <= sub_bits <= _MAX_SUB_BITS:
            continue
        probes = nhash * sum(math.comb(sub_bits, k) for k in range(nflip + 1))
        cost = probes * (1 + n / 2 ** sub_bits)
        if cost < best_cost:
            best, best_cost = (nhash, sub_bits, nflip), cost
    return best


def _multihash_pairs(codes: np.ndarray, radius: int, nhash: int, sub_bits: int, nflip: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    n, nbytes = codes.shape
    shuffled = np.unpackbits(codes, axis=1)[:, np.random.default_rng(0).permutation(nbytes * 8)]
    words = np.zeros((n, -(-nbytes // 8) * 8), np.uint8)  # whole uint64 words: 3 popcounts per pair, not 18
    words[:, :nbytes] = codes
    words = words.view(np.uint64)
    masks = np.array([sum(1 << b for b in flipped) for k in range(nflip + 1)
                      for flipped in itertools.combinations(range(sub_bits), k)], np.int64)
    place = 1 << np.arange(sub_bits - 1, -1, -1, dtype=np.int64)
    found = []
    for h in range(nhash):
        key = shuffled[:, h * sub_bits:(h + 1) * sub_bits] @ place
        rows = np.argsort(key, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=1 << sub_bits))])
        for mask in masks:
            probe = key ^ mask
            first, count = offsets[probe], offsets[probe + 1] - offsets[probe]
            ends = np.cumsum(count)
            for lo, hi in _blocks(ends):  # the candidates of rows lo..hi-1, at most one block's worth
                block_count = count[lo:hi]
                query = np.repeat(np.arange(lo, hi), block_count)
                rank = np.arange(len(query)) - np.repeat(ends[lo:hi] - block_count - (ends[lo - 1] if lo else 0),
                                                         block_count)
                other = rows[np.repeat(first[lo:hi], block_count) + rank]
                upper = query < other  # each unordered pair once: from its lower row, whose probe sees the other
                query, other = query[upper], other[upper]
                close = np.bitwise_count(words[query] ^ words[other]).sum(axis=1) <= radius
                found.append(query[close] * n + other[close])
    pairs = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return pairs // n, pairs % n


def _blocks(ends: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive row ranges whose candidate counts (cumulative ``ends``) sum to about _CANDIDATES_PER_BLOCK."""
    cuts = np.searchsorted(ends, np.arange(_CANDIDATES_PER_BLOCK, ends[-1], _CANDIDATES_PER_BLOCK), side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(ends)]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def greedy_claim(n: int, i: np.ndarray, j: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``dup_of`` (-1 = kept) from undirected duplicate pairs (i, j), visiting rows in preference ``order``:
    a kept row claims its unclaimed neighbours; a claimed row claims nothing (see module docstring)."""
    src = np.concatenate([i, j])
    dst = np.concatenate([j, i])
    sort = np.argsort(src, kind="stable")
    src, dst = src[sort], dst[sort]
    starts = np.searchsorted(src, np.arange(n + 1))
    has_pairs = np.diff(starts) > 0
    dup_of = np.full(n, -1, dtype=np.int64)
    claimed = np.zeros(n, dtype=bool)
    for row in order[has_pairs[order]]:  # rows without a duplicate are kept without a visit
        if claimed[row]:
            continue
        neighbours = dst[starts[row]:starts[row + 1]]
        fresh = neighbours[~claimed[neighbours]]
        dup_of[fresh] = row
        claimed[fresh] = True
        claimed[row] = True
    return dup_of


def keep_order(pixels: np.ndarray, n_bytes: np.ndarray, ids: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
    """Row indices from most to least preferred: more pixels, then a better source ``rank`` (lower first, e.g. an
    original's source before a re-saving mirror's: ``source_rank``), then larger file, then smaller id."""
    rank = np.zeros(len(ids), np.int64) if rank is None else rank
    return np.lexsort((ids, -n_bytes.astype(np.int64), rank, -pixels.astype(np.int64)))


def source_rank(sources: np.ndarray, priority: list[str]) -> np.ndarray:
    """Each row's rank under ``priority`` (preferred sources first): its position there; a source it does not name
    ranks after every named one."""
    position = {source: k for k, source in enumerate(priority)}
    return np.array([position.get(source, len(priority)) for source in sources], np.int64)


def find_duplicates(md5: np.ndarray, phash_codes: np.ndarray, colorhash_codes: np.ndarray,
                    order: np.ndarray, max_phash_distance: int, max_colorhash_distance: int) -> DupDecision:
    n = len(md5)
    i, j = near_pairs(phash_codes, max_phash_distance)
    close_colour = hamming(colorhash_codes[i], colorhash_codes[j]) <= max_colorhash_distance
    i, j = i[close_colour], j[close_colour]
    # byte-identical rows are duplicates whatever their hashes say
    _, group = np.unique(md5, return_inverse=True)
    by_group = np.argsort(group, kind="stable")
    same = group[by_group[1:]] == group[by_group[:-1]]
    i = np.concatenate([i, by_group[:-1][same]])
    j = np.concatenate([j, by_group[1:][same]])

    dup_of = greedy_claim(n, i, j, order)
    exact = (dup_of >= 0) & (md5 == md5[np.maximum(dup_of, 0)])
    return DupDecision(dup_of=dup_of, exact=exact)
