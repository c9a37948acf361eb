"""Copy the tables each benchmark recorded into the docs, with the command, commit and machine that made them.

    python benchmarks/results_page.py            # rewrite the generated regions of docs/results.md and benchmarks/README.md
    python benchmarks/results_page.py --check    # exit 1 if a region differs from its results file (a test runs this)

A generated region is

    <!-- results: curation_throughput.json -->
    ... (replaced) ...
    <!-- /results -->

and holds the provenance line and every table `benchmarks/results/<file>` recorded (``_common.markdown_table``
records what a run prints; ``_common.write_json`` stores it). The prose around a region is written by hand; the
numbers in it are the benchmark's own output, so they cannot drift from the results file.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = RESULTS_DIR.parents[1]
DOCS = [REPO_ROOT / "docs" / "results.md", REPO_ROOT / "benchmarks" / "README.md"]
REGION = re.compile(r"<!-- results: (?P<file>[\w.-]+) -->\n.*?<!-- /results -->", re.S)


class StaleResults(ValueError):
    """A region names a results file that is missing or recorded no tables."""


def render(name: str, results_dir: Path = RESULTS_DIR) -> str:
    path = results_dir / name
    if not path.is_file():
        raise StaleResults(f"{path} does not exist: run the benchmark that writes it")
    payload = json.loads(path.read_text())
    if not payload.get("tables"):
        raise StaleResults(f"{path} holds no tables (written before they were recorded): run "
                           f"`{payload.get('command', 'its benchmark')}` again")
    git = payload.get("git") or {}
    commit = (git.get("commit") or "unknown")[:7] + (" with krea2_core modified" if git.get("krea2_core_dirty") else "")
    machine = payload.get("machine") or {}
    provenance = (f"`{payload['command']}` at {commit}, {payload['date'][:10]}, "
                  f"{machine.get('cpu_model', 'unknown CPU')} ({machine.get('logical_cpus', '?')} logical CPUs); "
                  f"results: `benchmarks/results/{name}`")
    return "\n".join([f"<!-- results: {name} -->", provenance, "", "\n\n".join(payload["tables"]),
                      "<!-- /results -->"])


def regenerate(text: str, results_dir: Path = RESULTS_DIR) -> str:
    return REGION.sub(lambda match: render(match["file"], results_dir), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the docs are up to date")
    parser.add_argument("docs", nargs="*", type=Path, default=DOCS)
    args = parser.parse_args()
    stale = []
    for doc in args.docs:
        text = doc.read_text()
        try:
            new = regenerate(text)
        except StaleResults as err:
            print(f"{doc}: {err}", file=sys.stderr)
            return 1
        if new == text:
            continue
        if args.check:
            stale.append(doc)
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(doc),
                                                       f"{doc} (from benchmarks/results)"))
        else:
            doc.write_text(new)
            print(f"rewrote the generated regions of {doc}")
    if stale:
        print(f"\nout of date: {', '.join(map(str, stale))}; run python benchmarks/results_page.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
