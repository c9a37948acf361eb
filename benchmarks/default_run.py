"""The README's main command, cold and timed, then `krea2 report` of the run it made.

    python benchmarks/default_run.py        # ~20 min on 2 cores

Runs `/usr/bin/time -v pyflyte run workflows/end_to_end.py krea2_pipeline` from the repository root with a fresh HOME
(so no Flyte local cache) and a fresh output root (so no artifact and no MLflow store), exactly the command a new
user runs after `.ci/setup`. Records its wall time, exit code and peak RSS (the largest process, from `time -v`),
then the per-stage table of `krea2 report` on that store. Writes benchmarks/results/default_run.json, whose tables
docs/results.md shows (benchmarks/results_page.py). Unlike the other scripts, the pipeline runs on every core.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import _common

COMMAND = ["pyflyte", "run", "workflows/end_to_end.py", "krea2_pipeline"]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="krea2-default-run-") as scratch:
        home, root = Path(scratch) / "home", Path(scratch) / "outputs"
        home.mkdir()
        env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI",
                                                                              "KREA2_LOCAL_TRACKING_URI")}
        env.update({"HOME": str(home), "KREA2_OUTPUT_ROOT": str(root)})
        # the thread pins _common sets are for the per-core benchmarks; the pipeline uses the machine as a user would
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS"):
            env.pop(name, None)
        log = Path(scratch) / "run.log"
        start = time.perf_counter()
        with log.open("w") as out:
            done = subprocess.run(["/usr/bin/time", "-v", *COMMAND], cwd=_common.REPO_ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        text = log.read_text(errors="replace")
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        peak_gib = int(rss.group(1)) / 2**20 if rss else float("nan")
        print(text[-3000:])
        print(_common.markdown_table(["command", "exit code", "wall min", "peak RSS GiB (largest process)"],
                                     [[" ".join(COMMAND), done.returncode, f"{wall / 60:.1f}", f"{peak_gib:.1f}"]],
                                     caption="cold: fresh HOME and output root"))
        os.environ["KREA2_OUTPUT_ROOT"] = str(root)
        from krea2_core.report import format_report, latest_pipeline_run, stage_report
        from krea2_core.tracking import configure_tracking

        configure_tracking(root)
        report = format_report(stage_report(latest_pipeline_run()))
        print(report)
        _common.TABLES.append(f"`krea2 report` of that run\n\n{report}")
        path = _common.write_json("default_run.json", {
            "benchmark": "default_run", "exit_code": done.returncode, "wall_seconds": wall,
            "peak_rss_gib": peak_gib, "log_tail": text[-5000:]})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
