"""The prompt expander's three stages on a previous pipeline run's captions and image model, timed, with the
held-out evaluation printed (what README's "Measured" reports):

    python benchmarks/expander_stages.py --captions <captions artifact> --image-model <checkpoint artifact> \
        --root <output root> [--preset tiny] [--config overrides.yaml]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from krea2_core.config import load_config
from krea2_core.expander.data import run_expander_data
from krea2_core.expander.rl import ExpanderRLSettings, run_expander_rl
from krea2_core.expander.sft import ExpanderSFTSettings, run_expander_sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=Path, required=True)
    parser.add_argument("--image-model", type=Path, required=True, help="the pipeline's distilled student")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--config", default="")
    args = parser.parse_args()
    cfg = load_config(args.preset, args.config)
    x = cfg.expander
    seconds = {}
    began = time.perf_counter()
    pairs = run_expander_data({"captions": args.captions}, x.data, root=args.root)
    seconds["data"], began = time.perf_counter() - began, time.perf_counter()
    sft = run_expander_sft({"pairs": pairs}, ExpanderSFTSettings(x.sft, x.expansion, cfg.post.resolution),
                           root=args.root)
    seconds["sft"], began = time.perf_counter() - began, time.perf_counter()
    rl = run_expander_rl({"sft": sft, "image_model": args.image_model},
                         ExpanderRLSettings(x.rl, x.expansion, cfg.post.resolution, cfg.pretrain.run_config()),
                         root=args.root)
    seconds["rl"] = time.perf_counter() - began
    report = json.loads((rl / "eval.json").read_text())
    print(json.dumps({"artifacts": {"pairs": str(pairs), "sft": str(sft), "rl": str(rl)}, "seconds": seconds,
                      **{k: v for k, v in report.items() if k != "examples"}}, indent=1))


if __name__ == "__main__":
    main()
