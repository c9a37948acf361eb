"""`krea2`: run stages without Flyte, re-run one stage, and inspect lineage.

    krea2 curate ./images [--preset tiny] [--config overrides.yaml]
    krea2 rerun <stage> --from-run <mlflow run id> [--preset tiny] [--config overrides.yaml] [--dry-run]
    krea2 lineage <mlflow run id>
    krea2 report [<pipeline or stage run id>]
    krea2 verify [<output root>] [--full] [--repair]
    krea2 ui [--port 8765] [--mlflow-url http://127.0.0.1:5000]
    krea2 expand --model <expander artifact, model dir or id> [--n N --sample --seed S --show-thinking] PROMPT...

A failure is one line on stderr (exit 2 for bad input, a damaged artifact, a failed rank or an unreachable tracking
server; 1 for anything else); `krea2 --debug ...` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from krea2_core.artifacts import read_manifest
from krea2_core.common.strict import ConfigError
from krea2_core.config import load_config
from krea2_core.stages import output_root
from krea2_core.tracking import describe_tracking_error
from krea2_core.training.launch import RankFailed

# bad input, a damaged or missing file, an unreachable server, a failed rank: one line and exit 2; else exit 1
_EXPECTED = (MlflowException, ConfigError, OSError, ValueError, RankFailed)


def _curate(args: argparse.Namespace) -> int:
    from krea2_core.common.layout import SUMMARY_FILE
    from krea2_core.data.stages import INGEST, SCORING, selection_spec
    from krea2_core.stage_spec import run_stage

    config = load_config(args.preset, args.config)
    raw_pool = run_stage(INGEST, config, {"source": Path(args.source)})
    scores = run_stage(SCORING, config, {"raw_pool": raw_pool})
    curated = {stage: run_stage(selection_spec(stage), config, {"raw_pool": raw_pool, "scores": scores})
               for stage in config.curation.stages}
    print(json.dumps({stage: {"curated": str(path), "mlflow_run_id": read_manifest(path).mlflow_run_id,
                              "summary": json.loads((path / SUMMARY_FILE).read_text())}
                      for stage, path in curated.items()}, indent=2))
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from krea2_core.tracking import configure_tracking, lineage, output_location

    root = output_root()
    configure_tracking(root)
    client = MlflowClient()
    for stage, run_id in lineage(args.run_id).items():
        tags = client.get_run(run_id).data.tags
        path = output_location(tags, root)
        digest = read_manifest(path).digest[:16] if path and path.is_dir() else tags.get("krea2.output_digest", "")[:16]
        print(f"{stage:<12} run {run_id}  output {digest}  {path or ''}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from krea2_core.report import format_report, latest_pipeline_run, stage_report
    from krea2_core.tracking import configure_tracking

    configure_tracking(output_root())
    print(format_report(stage_report(args.run_id or latest_pipeline_run())))
    return 0


def _rerun(args: argparse.Namespace) -> int:
    from krea2_core.rerun import plan, rerun
    from krea2_core.tracking import configure_tracking

    configure_tracking(output_root())
    config = load_config(args.preset, args.config)
    if args.dry_run:
        for stage, reruns, why in plan(args.from_run, config):
            print(f"{stage:<20} {'RE-RUN' if reruns else 'cached':<7} {why}")
        return 0
    path, parent = rerun(args.stage, args.from_run, config, args.preset)
    manifest = read_manifest(path)
    print(json.dumps({"stage": args.stage, "output": str(path), "mlflow_run_id": manifest.mlflow_run_id,
                      "rerun_run_id": parent, "counts": manifest.counts}, indent=2))
    return 0


def _ui(args: argparse.Namespace) -> int:
    from krea2_core.ui.app import serve

    serve(output_root(), args.host, args.port, args.mlflow_url)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from krea2_core.verify import repair, verify_root

    root = Path(args.root) if args.root else output_root()
    if not (root / "artifacts").is_dir():
        raise FileNotFoundError(f"{root} is not an output root: it has no artifacts/ directory")
    findings = verify_root(root, full=args.full)
    for finding in findings:
        if finding.verdict != "sound":
            print(f"{finding.verdict:<14} {finding.path}  {finding.detail}")
    removed = repair(findings) if args.repair else []
    for path in removed:
        print(f"removed        {path}")
    counts = {v: sum(f.verdict == v for f in findings)
              for v in ("sound", "retryable", "damaged", "stale staging", "staging")}
    print(f"{len(findings)} entries: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
          + (f"; removed {len(removed)}: their stages compute them again on the next run" if removed else ""))
    return 1 if counts["damaged"] + counts["stale staging"] > 0 and not removed else 0


def _expand(args: argparse.Namespace) -> int:
    from krea2_core.expander.model import expand

    expansions = expand(args.prompts, args.model, n=args.n, greedy=not args.sample, temperature=args.temperature,
                        top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device)
    for i, prompt in enumerate(args.prompts):
        print(f"prompt: {prompt}")
        for j, expansion in enumerate(expansions[i * args.n:(i + 1) * args.n], start=1):
            if args.show_thinking:
                print(f"  {j}. think: {expansion.thinking}")
            marker = "" if expansion.well_formed else "  [malformed answer: the prompt is kept]"
            print(f"  {j}. {expansion.text}{marker}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="krea2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    commands = parser.add_subparsers(dest="command", required=True)
    curate = commands.add_parser("curate", help="ingest, score and select an image folder or URI table")
    curate.add_argument("source", help="image folder, Parquet table with a 'uri' column, or a world_pool artifact")
    curate.add_argument("--preset", default="tiny", choices=["tiny", "small", "full"])
    curate.add_argument("--config", default="", help="YAML overrides (file or inline)")
    curate.set_defaults(run=_curate)
    again = commands.add_parser("rerun", help="run one stage again on the inputs a recorded run used")
    again.add_argument("stage", help="stage name, e.g. selection_512, captioning_256, pack_512, pretrain_1024")
    again.add_argument("--from-run", required=True, help="a pipeline run or any stage run downstream of the stage")
    again.add_argument("--preset", default="tiny", choices=["tiny", "small", "full"])
    again.add_argument("--config", default="", help="YAML overrides (file or inline)")
    again.add_argument("--dry-run", action="store_true", help="say which stages this config would re-run, and why")
    again.set_defaults(run=_rerun)
    trace = commands.add_parser("lineage", help="the stage runs and outputs upstream of an MLflow run")
    trace.add_argument("run_id")
    trace.set_defaults(run=_lineage)
    table = commands.add_parser("report", help="each stage of a pipeline run: its run, wall time, headline metrics")
    table.add_argument("run_id", nargs="?", default="", help="a pipeline or stage run (default: the newest pipeline run)")
    table.set_defaults(run=_report)
    check = commands.add_parser("verify", help="check every artifact of an output root against its manifest")
    check.add_argument("root", nargs="?", default="",
                       help="output root (default: $KREA2_OUTPUT_ROOT or ./krea2-outputs)")
    check.add_argument("--full", action="store_true", help="re-hash every file, also of artifacts above "
                                                           "KREA2_VERIFY_MAX_BYTES (checked by size otherwise)")
    check.add_argument("--repair", action="store_true", help="remove damaged and retryable artifacts and staging "
                                                             "directories of dead processes, so their stages recompute "
                                                             "them")
    check.set_defaults(run=_verify)
    web = commands.add_parser("ui", help="a local web UI: runs, their stages, dry runs and re-runs of one stage")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    web.add_argument("--port", type=int, default=8765)
    web.add_argument("--mlflow-url", default="", help="an MLflow UI serving the same store, for links to its runs")
    web.set_defaults(run=_ui)
    grow = commands.add_parser("expand", help="expand user prompts with a prompt-expander model")
    grow.add_argument("prompts", nargs="+", metavar="PROMPT")
    grow.add_argument("--model", required=True, help="expander artifact, model directory, hub id or 'smollm2'")
    grow.add_argument("--n", type=int, default=1, help="expansions per prompt")
    grow.add_argument("--sample", action="store_true", help="sample (temperature, top-p) instead of greedy")
    grow.add_argument("--temperature", type=float, default=1.0)
    grow.add_argument("--top-p", type=float, default=0.95)
    grow.add_argument("--seed", type=int, default=0)
    grow.add_argument("--max-new-tokens", type=int, default=128)
    grow.add_argument("--show-thinking", action="store_true", help="print each thinking trace too")
    grow.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    grow.set_defaults(run=_expand)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except Exception as err:
        if args.debug:
            if isinstance(err, RankFailed) and err.rank_traceback:
                print(err.rank_traceback, file=sys.stderr)
            raise
        expected = isinstance(err, _EXPECTED)
        hint = "" if expected else " (krea2 --debug shows the traceback)"
        print(f"krea2: error: {_one_line(err, expected)}{hint}", file=sys.stderr)
        return 2 if expected else 1


def _one_line(err: Exception, expected: bool) -> str:
    """The first line of an error's message (an unexpected error's type first: it may say little on its own)."""
    if isinstance(err, MlflowException):
        return describe_tracking_error(err)
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return first if expected and first else f"{type(err).__name__}: {first}".rstrip(": ")


if __name__ == "__main__":
    sys.exit(main())
