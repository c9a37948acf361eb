"""Shared helpers for the benchmark scripts (not a test module; pytest never collects it).

Import this module FIRST in a benchmark script: it pins every numeric library to one thread before
numpy is imported, so all timings are per core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def load_imagededup_hashing() -> types.ModuleType:
    """``imagededup.methods.hashing`` without running the package ``__init__`` files that need torch.

    imagededup 0.3.3 is installed with --no-deps: ``imagededup/methods/__init__.py`` also imports the
    CNN method (torch + torchvision) and ``imagededup/utils/__init__.py`` imports the CNN model and
    the matplotlib plotter. Neither is needed for hashing, and torchvision cannot be installed here.
    Registering empty package objects (with the real ``__path__``) for ``imagededup.methods`` and
    ``imagededup.utils`` in ``sys.modules`` lets Python import their submodules (hashing, image_utils,
    general_utils, logger) from the installed files while skipping the two ``__init__`` bodies. The
    hashing code that runs is imagededup's own, unmodified.
    """
    import imagededup

    root = Path(imagededup.__file__).parent
    for name in ("methods", "utils"):
        full = f"imagededup.{name}"
        if full not in sys.modules:
            package = types.ModuleType(full)
            package.__path__ = [str(root / name)]
            package.__package__ = full
            sys.modules[full] = package
    import logging

    import imagededup.methods.hashing as hashing

    # imagededup logs INFO lines for every find_duplicates call; keep the benchmark output readable
    logging.getLogger("imagededup").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("imagededup"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return hashing


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    import numpy
    import PIL

    info: dict[str, object] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "threads_per_method": 1,
    }
    for module in ("imagehash", "imagededup", "scipy", "faiss"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - version info is best effort
            info[module] = None
    return info


def git_revision() -> dict[str, object]:
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "krea2_core_dirty": bool(git("status", "--porcelain", "krea2_core"))}
    except OSError:
        return {"commit": None, "krea2_core_dirty": None}


# the code a benchmark runs is the checkout it started from, not whatever HEAD is when a long run ends
STARTED_AT = git_revision()


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


TABLES: list[str] = []  # every table this run made, in order: write_json records them for the docs


def write_json(name: str, payload: dict[str, object]) -> Path:
    """The results with their provenance (date, command, commit, machine) and the tables printed so far, which
    benchmarks/results_page.py copies into the docs."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    payload = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": command_line(), "git": STARTED_AT, "machine": machine_info(), **payload,
               "tables": TABLES}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[object]], caption: str = "") -> str:
    """A Markdown table under its caption, if any (recorded for write_json)."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    shown = f"{caption}\n\n" * bool(caption) + "\n".join(lines)
    TABLES.append(shown)
    return shown
