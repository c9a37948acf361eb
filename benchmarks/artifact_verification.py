"""What verifying an artifact on read costs, against reading its files once (what any consumer of the artifact does).

    python benchmarks/artifact_verification.py            # defaults: --sizes-mib 16 256 1024 --files 8 --repeats 3

For each size, an artifact of ``--files`` equal random files is published into a temp output root; then, best of
``--repeats`` (page cache warm: the files were just written):
- baseline: read every file's bytes once;
- a first read: parse the manifest, list, stat and re-hash every file (sha256), as the first ``read_manifest`` of a
  process does for an artifact up to ``KREA2_VERIFY_MAX_BYTES``;
- a repeat ``read_manifest`` (same stats: parse, list, stat);
- sizes only, as for an artifact above the limit.
"""

from __future__ import annotations

import _common  # noqa: F401  (first: pins numeric libraries to one thread)

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import markdown_table, write_json

from krea2_core.artifacts import parse_manifest, publish, read_manifest, staged_dir, verify


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _measure(out: Path, repeats: int) -> dict[str, float]:
    """Seconds, best of ``repeats``, for each way of opening the artifact at ``out``."""
    def read_files() -> None:
        for file in out.glob("*.bin"):
            file.read_bytes()

    read_manifest(out)  # verified once: the cached case below is a repeat
    return {
        "read_files_s": _best(read_files, repeats),
        # what the first read_manifest of a process does below the limit: parse, list, stat, re-hash every file
        "first_read_manifest_s": _best(lambda: verify(out, parse_manifest(out), full=True), repeats),
        "repeat_read_manifest_s": _best(lambda: read_manifest(out), repeats),
        # above KREA2_VERIFY_MAX_BYTES: parse, list, stat, compare sizes
        "sizes_only_read_manifest_s": _best(lambda: verify(out, parse_manifest(out), full=False), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes_mib:
            out = Path(tmp) / "artifacts" / "thing" / f"{size}mib"
            with staged_dir(out) as staging:
                for index in range(args.files):
                    (staging / f"part-{index}.bin").write_bytes(os.urandom(size * 2**20 // args.files))
                publish(staging, out, kind="thing")
            t = _measure(out, args.repeats)
            results.append({"size_mib": size, "files": args.files, **t})
            base = t["read_files_s"]
            rows.append([size, f"{base:.4f}", f"{t['first_read_manifest_s']:.4f}", t["first_read_manifest_s"] / base,
                         f"{t['repeat_read_manifest_s'] * 1e3:.2f}", t["repeat_read_manifest_s"] / base,
                         f"{t['sizes_only_read_manifest_s'] * 1e3:.2f}", t["sizes_only_read_manifest_s"] / base,
                         size / 1024 / t["first_read_manifest_s"]])
    table = markdown_table(["MiB", "read files s (baseline)", "first read_manifest s", "x baseline",
                            "repeat ms", "x baseline", "sizes-only ms", "x baseline", "re-hash GiB/s"], rows)
    print(table)
    print(f"wrote {write_json('artifact_verification.json', {'results': results, 'table': table})}")


if __name__ == "__main__":
    main()
