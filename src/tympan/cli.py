"""`tympan <stage>`: thin commands over tympan.stages; dvc.yaml passes every path."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from tympan.config import ConfigError, Params, load_params, to_dict


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tympan", description=__doc__)
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (default: params.yaml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, *paths: str) -> None:
        command = sub.add_parser(name, help=help_text)
        for path in paths:
            command.add_argument(f"--{path}", type=Path, required=True)

    add("demo", "generate the built-in demo dataset", "out")
    add(
        "ingest",
        "list and probe recordings; write the manifest and rejects",
        "manifest",
        "rejects",
        "summary",
    )
    add("split", "assign train/val/test without group leakage", "manifest", "out", "report")
    add(
        "featurize",
        "compute the log-mel cache and train-split statistics",
        "manifest",
        "splits",
        "out",
    )
    add("train", "train one model per seed, tracked in MLflow", "features", "manifest", "out")
    sub.choices["train"].add_argument(
        "--tuned", type=Path, help="best params from the tune stage (applied over the params file)"
    )
    tune = sub.add_parser("tune", help="Optuna search over tune.space; resumable, shareable")
    tune.add_argument("--features", type=Path, required=True)
    tune.add_argument("--out", type=Path, help="best params file (the stage's output)")
    tune.add_argument("--trials", type=Path, help="trials table (the stage's output)")
    tune.add_argument(
        "--worker",
        action="store_true",
        help="only work on the shared study's queued trials; write nothing",
    )
    tune.add_argument(
        "--wait-s",
        type=float,
        default=60.0,
        help="with --worker: wait this long for `tympan tune` to queue trials",
    )
    add(
        "evaluate",
        "test metrics per seed and for the ensemble; plots, worst predictions, breakdowns",
        "features",
        "models",
        "metrics",
        "plots",
        "test-set",
    )
    add(
        "register",
        "log the pyfunc model, register it, set champion or challenger, write the model card",
        "models",
        "metrics",
        "split",
        "test-set",
        "out",
        "card",
    )
    preset = sub.add_parser("preset", help="make pipelines/NAME.yaml the active params.yaml")
    preset.add_argument("name", help="a preset in pipelines/ (e.g. demo, fsdd)")
    preset.add_argument("--dir", type=Path, default=Path("pipelines"))
    serve = sub.add_parser(
        "serve",
        help="serve a registered model over HTTP: MLflow's scoring app behind request limits",
    )
    serve.add_argument("-m", "--model-uri", required=True, help="e.g. models:/tympan-demo@champion")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("-p", "--port", type=int, default=5000)
    serve.add_argument("-w", "--workers", type=int, default=1, help="server processes")
    predict = sub.add_parser(
        "predict",
        help="score audio files or folders with a registered model, in this process",
        description="Score audio files (and every .wav/.flac/.ogg under each folder) with a "
        "registered model; bad files are rows with their reason, not fatal.",
    )
    predict.add_argument("inputs", type=Path, nargs="+", help="audio files or folders")
    predict.add_argument("--model", required=True, help="e.g. models:/tympan-demo@champion")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
    predict.add_argument(
        "--side", type=_side, action="append", default=[], help="side attribute NAME=VALUE"
    )
    predict.add_argument(
        "--side-table", type=Path, help="CSV with a 'path' column and one column per attribute"
    )
    compare = sub.add_parser(
        "compare-protocols",
        help="run a study's honest preset and its _original variant; print one table",
        description="Run pipelines/STUDY.yaml and pipelines/STUDY_original.yaml end to end "
        "(ingest .. evaluate, tracked in MLflow), each in a folder of its own under --work, "
        "and print the test metric of both with its seed spread and the leaks the original "
        "protocol reproduces.",
    )
    compare.add_argument("study", help="an honest preset with an _original variant")
    compare.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="for both runs, e.g. data.root=/data/accent or train.seeds=[0,1] (YAML values)",
    )
    compare.add_argument("--work", type=Path, default=Path(".tympan/protocols"))
    compare.add_argument("--dir", type=Path, default=Path("pipelines"))
    summary = sub.add_parser("summary", help="print the registered model, metrics, next commands")
    summary.add_argument("--registered", type=Path, default=Path("reports/registered.json"))
    summary.add_argument("--metrics", type=Path, default=Path("metrics/test.json"))
    return parser


def _side(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _summary(registered: Path, metrics: Path) -> None:
    if not registered.exists():
        sys.exit(f"{registered} not found: run `dvc repro` first")
    reg = json.loads(registered.read_text())
    test = json.loads(metrics.read_text())
    ens, mean, std = test["ensemble"], test["seed_mean"], test["seed_std"]
    uri = reg["tracking_uri"]
    print(f"\nRegistered model: {reg['name']} version {reg['version']} -> @{reg['alias']}")
    print(f"  {reg['reason']}")
    print(
        f"Test metrics on {test['n_test']} clips (ensemble of {len(test['seeds'])} seeds; "
        "per-seed mean +- std):"
    )
    for key in ens:
        print(f"  {key:<18} {ens[key]:.4f}   seeds {mean[key]:.4f} +- {std[key]:.4f}")
    card = registered.parent / "model_card.md"
    if card.exists():
        print(f"Model card: {card} (also the version's description in mlflow ui)")
    activate = os.path.relpath(Path(sys.executable).parent / "activate")
    print("\nLook further (the commands need the project's environment on PATH):")
    print(f"  . {activate}")
    print(f"  mlflow ui --backend-store-uri {uri} --port 5001")
    print("  dvc metrics show      dvc plots show   (then open dvc_plots/index.html)")
    print("  dvc exp show --drop '.*' --keep 'Experiment|Created|test_|train\\.(lr|epochs)$'")
    print(f"  MLFLOW_TRACKING_URI={uri} tympan serve -m models:/{reg['name']}@champion -p 5000")
    print(
        "  python -m tympan.serving.client data/demo/audio/tone_0000.wav "
        "--url http://127.0.0.1:5000/invocations"
    )


def _compare(args: argparse.Namespace) -> None:
    from tympan.compare import compare, log_table, parse_override, study_runs, table

    study = args.study.removesuffix("_original")
    try:
        common = dict(parse_override(text) for text in args.overrides)
    except ValueError as exc:
        sys.exit(f"tympan compare-protocols: --set {exc}")
    try:
        rows = compare(study_runs(study), args.dir, args.work / study, common, study)
    except _stage_errors() as exc:
        sys.exit(f"tympan compare-protocols: {exc}")
    text = table(rows)
    (args.work / study / "protocols.md").write_text(text)
    run_id = log_table(
        rows, text, load_params(args.dir / f"{study}.yaml").tracking.experiment, f"compare-{study}"
    )
    print(f"\n{text}\n(table: {args.work / study / 'protocols.md'}; MLflow run {run_id})")


def _use_preset(folder: Path, name: str, target: Path) -> None:
    source = folder / f"{name}.yaml"
    if not source.exists():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        sys.exit(f"no preset {name!r} in {folder}/ (known: {known})")
    try:
        params = load_params(source)
    except ConfigError as exc:
        sys.exit(f"preset {name}: {exc}")
    raw = yaml.safe_load(source.read_text()) or {}
    if set(raw) >= {f.name for f in dataclasses.fields(Params)}:
        target.write_text(source.read_text())  # complete: kept as written, comments included
    else:
        # an overlay on the defaults: every key written out, so DVC finds each param it tracks
        base = f" over {raw['extends']}" if "extends" in raw else ""
        target.write_text(
            f"# preset {name}: {source}{base} over tympan's defaults (the comments are there).\n"
            f"# Generated by `tympan preset {name}`; edit freely or regenerate.\n"
            + yaml.safe_dump(to_dict(params), sort_keys=False)
        )
    print(
        f"{target} is now preset {params.preset!r} ({source}); run `dvc repro` or "
        f"`dvc exp run` to build it"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "mlflow", "urllib3", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "summary":
        _summary(args.registered, args.metrics)
        return
    if args.command == "preset":
        _use_preset(args.dir, args.name, args.params)
        return
    if args.command == "compare-protocols":
        _compare(args)
        return
    if args.command == "predict":
        from tympan.serving.batch import main as predict_main

        predict_main(args)
        return
    if args.command == "serve":
        from tympan.serving.server import serve

        try:
            serve(args.model_uri, args.host, args.port, args.workers)
        except ValueError as exc:
            sys.exit(f"tympan serve: {exc}")
        return
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        sys.exit(f"tympan {args.command}: {exc}")
    from tympan import stages

    run = getattr(stages, f"run_{args.command}")
    paths = {k: v for k, v in vars(args).items() if k not in ("params", "verbose", "command")}
    if args.command == "tune" and not args.worker and (args.out is None or args.trials is None):
        sys.exit("tympan tune: --out and --trials are required unless --worker")
    try:
        run(params, **paths)
    except _stage_errors() as exc:
        sys.exit(f"tympan {args.command}: {exc}")


def _stage_errors() -> tuple[type[Exception], ...]:
    """The errors a stage reports as a one-line message (a traceback is for bugs)."""
    from tympan.data.adapters import AdapterError
    from tympan.data.ingest import IngestError
    from tympan.data.manifest import ManifestError
    from tympan.data.splits import LeakageError, SplitError
    from tympan.evaluation.report import EvaluationError
    from tympan.features.cache import FeatureError
    from tympan.tuning.study import TuneError

    return (
        AdapterError,
        IngestError,
        ManifestError,
        LeakageError,
        SplitError,
        FeatureError,
        EvaluationError,
        TuneError,
        ConfigError,
    )


if __name__ == "__main__":
    main()
