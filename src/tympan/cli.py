"""`tympan <stage>`: thin commands over tympan.stages; dvc.yaml passes every path."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from tympan.config import ConfigError, Params, flatten, load_params, to_dict

DESCRIPTION = """\
tympan: audio datasets to tracked, tuned, served models. Each pipeline stage is one
subcommand, run by `dvc repro` with the paths dvc.yaml gives it and the params file's
sections it lists; the other subcommands set up, look at and serve what the pipeline built.
"""

EPILOG = """\
pipeline (dvc.yaml): demo -> ingest -> split -> featurize -> tune -> train -> evaluate ->
register. Start with `tympan preset NAME && dvc repro register` (or `dvc repro` for the
built-in demo), then `tympan summary`. `tympan COMMAND --help` explains each command.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tympan",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        metavar="FILE",
        help="params file every stage reads (default: params.yaml); `tympan preset` writes it",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, details: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}." + (f" {details}" if details else ""),
        )

    def paths(cmd: argparse.ArgumentParser, **described: str) -> None:
        """Required path options, as dvc.yaml passes them (`--test-set` for test_set)."""
        for name, text in described.items():
            cmd.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True, help=text)

    demo = command(
        "demo",
        "generate the built-in demo dataset",
        "Six synthetic sound classes in recording sessions (the `demo` params section).",
    )
    paths(demo, out="folder to write (metadata.csv and audio/)")
    ingest = command(
        "ingest",
        "list and probe recordings; write the manifest and rejects",
        "The `data.adapter` reads `data.root`; every file is decoded and hashed; bad files go "
        "to the rejects with their reason. The summary holds the distribution of durations, "
        "sample rates and channels.",
    )
    paths(
        ingest,
        manifest="manifest CSV to write (one row per accepted recording)",
        rejects="rejects CSV to write (path, reason)",
        summary="ingest report JSON to write",
    )
    split = command(
        "split",
        "assign train/val/test without group leakage",
        "By `split.strategy` (and `cv.folds`); fails if a group or an identical file would be "
        "in two splits, looks for recordings in different groups that sound the same "
        "(`split.similar`), and checks that the `evaluate.breakdown` columns exist.",
    )
    paths(
        split,
        manifest="manifest CSV (from ingest)",
        out="splits CSV to write",
        report="split report JSON to write (sizes, groups, leak checks)",
    )
    split.add_argument(
        "--fingerprints",
        type=Path,
        default=None,
        help="folder caching the content check's fingerprints by sha256 (split.similar); "
        "without it every recording is fingerprinted anew",
    )
    featurize = command(
        "featurize",
        "compute the feature cache and train-split statistics",
        "The `features` section's stack, one memory-mapped array per feature set; sets whose "
        "key is found in DVC's cache are copied, not recomputed.",
    )
    paths(
        featurize,
        manifest="manifest CSV (from ingest)",
        splits="splits CSV (from split)",
        out="feature cache folder to write",
    )
    tune = command(
        "tune",
        "Optuna search over tune.space; resumable, shareable",
        "Off unless `tune.enabled`; then the study lives in `tune.storage`.",
    )
    tune.add_argument("--features", type=Path, required=True, help="feature cache folder")
    tune.add_argument("--out", type=Path, help="best params YAML to write (the stage's output)")
    tune.add_argument("--trials", type=Path, help="trials CSV to write (the stage's output)")
    tune.add_argument(
        "--summary", type=Path, help="the study's figures, a DVC metrics file (the stage's output)"
    )
    tune.add_argument(
        "--worker",
        action="store_true",
        help="only work on the shared study's queued trials; write nothing",
    )
    tune.add_argument(
        "--wait-s",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --worker: wait this long for `tympan tune` to queue trials (default: 60)",
    )
    train = command(
        "train",
        "train one model per seed (and CV fold), tracked in MLflow",
        "One MLflow parent run, a child per member; `models/` holds every member's weights.",
    )
    paths(
        train,
        features="feature cache folder (from featurize)",
        manifest="manifest CSV (logged as the run's dataset)",
        out="models folder to write (bundle.pt, train.json, history.csv)",
    )
    train.add_argument(
        "--tuned",
        type=Path,
        metavar="FILE",
        help="best params from the tune stage, applied over the params file (default: none)",
    )
    evaluate = command(
        "evaluate",
        "test metrics per seed and for the ensemble; plots, worst predictions, breakdowns",
    )
    paths(
        evaluate,
        features="feature cache folder (from featurize)",
        models="models folder (from train)",
        metrics="metrics folder to write",
        plots="plots folder to write",
        test_set="test-set fingerprint JSON to write (what register compares)",
    )
    register = command(
        "register",
        "log the pyfunc model, register it, set champion or challenger, write the model card",
    )
    paths(
        register,
        models="models folder (from train)",
        metrics="metrics folder (from evaluate)",
        split="split report JSON (from split)",
        test_set="test-set fingerprint JSON (from evaluate)",
        out="registration record JSON to write",
        card="model card markdown to write",
    )
    repro = command(
        "repro",
        "`dvc repro` recorded as one MLflow run in tracking.experiment (the MLproject's command)",
        "Under `mlflow run` the project run is the record when it is in tracking.experiment; "
        "else the record is a new run there and the project run links to it. When DVC runs "
        "no stage, the record says so and names the run behind the current outputs.",
    )
    repro.add_argument(
        "targets", nargs="*", help="stages to reproduce, as for `dvc repro` (default: all)"
    )
    repro.add_argument(
        "-s",
        "--single-item",
        action="store_true",
        help="reproduce only the named stages, not what they depend on (as `dvc repro -s`)",
    )
    repro.add_argument(
        "--train-record",
        type=Path,
        default=Path("models/train.json"),
        metavar="FILE",
        help="train's record, naming the run behind the current model (default: models/train.json)",
    )
    preset = command(
        "preset",
        "make pipelines/NAME.yaml the active params file",
        "Validates the preset and writes every key (the preset's values over the defaults). "
        "Refuses to overwrite a params file with edits of its own unless --force; keeps "
        "`data.root` when the new preset reads the same layout (adapter).",
    )
    preset.add_argument("name", help="a preset in --dir, e.g. demo, fsdd_digits, s4_esc50_bigru")
    preset.add_argument(
        "--dir",
        type=Path,
        default=Path("pipelines"),
        metavar="FOLDER",
        help="where the presets are (default: pipelines)",
    )
    preset.add_argument(
        "--force",
        action="store_true",
        help="overwrite the params file even when it has edits no preset holds",
    )
    schema = command(
        "schema",
        "write params.yaml's JSON Schema, for editors",
        "Types, ranges, choices, defaults and descriptions read off the params loader's "
        "dataclasses; yaml-language-server (VS Code's YAML extension and others) then checks "
        "and completes params files.",
    )
    schema.add_argument(
        "--out",
        type=Path,
        default=Path("params.schema.json"),
        metavar="FILE",
        help="where to write it (default: params.schema.json)",
    )
    serve = command(
        "serve",
        "serve a registered model over HTTP: MLflow's scoring app behind request limits",
        "Limits come from the environment (TYMPAN_MAX_REQUEST_MB and friends; see README).",
    )
    serve.add_argument(
        "-m", "--model-uri", required=True, help="model to serve, e.g. models:/tympan-demo@champion"
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1; 0.0.0.0 only on purpose)",
    )
    serve.add_argument("-p", "--port", type=int, default=5000, help="port (default: 5000)")
    serve.add_argument("-w", "--workers", type=int, default=1, help="server processes (default: 1)")
    predict = command(
        "predict",
        "score audio files or folders with a registered model, in this process",
        "Every .wav/.flac/.ogg under each folder; bad files are rows with their reason, not fatal.",
    )
    predict.add_argument("inputs", type=Path, nargs="+", help="audio files or folders")
    predict.add_argument(
        "--model", required=True, help="model to use, e.g. models:/tympan-demo@champion"
    )
    predict.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        help="CSV to write (default: predictions.csv)",
    )
    predict.add_argument(
        "--side",
        type=_side,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a side attribute for every file, e.g. language=english (repeatable)",
    )
    predict.add_argument(
        "--side-table",
        type=Path,
        metavar="CSV",
        help="per-file side attributes: a 'path' column and one column per attribute",
    )
    summary = command(
        "summary", "print the registered model, its test metrics and where to look next"
    )
    summary.add_argument(
        "--registered",
        type=Path,
        default=Path("reports/registered.json"),
        metavar="FILE",
        help="register's record (default: reports/registered.json)",
    )
    summary.add_argument(
        "--metrics",
        type=Path,
        default=Path("metrics/test.json"),
        metavar="FILE",
        help="evaluate's test metrics (default: metrics/test.json)",
    )
    weights = command(
        "weights",
        "torchvision's ImageNet weights for model.weights: imagenet (where, fetch)",
        "`where` prints the file each backbone's model.weights: imagenet reads (torchvision's "
        "cache under $TORCH_HOME) and whether it is there and intact; `fetch` downloads it there "
        "and checks its published hash (needs internet; training never downloads).",
    )
    weights.add_argument(
        "action", choices=("where", "fetch"), help="where: show the file; fetch: download it"
    )
    weights.add_argument("names", nargs="+", metavar="NAME", help="alexnet vgg16 resnet50 ...")
    compare = command(
        "compare-protocols",
        "run a study's honest preset and its _original variant; print one table",
        "Runs pipelines/STUDY.yaml and pipelines/STUDY_original.yaml end to end (ingest .. "
        "evaluate, tracked in MLflow), each in a folder of its own under --work, and prints the "
        "test metric of both with its seed spread and the leaks the original protocol reproduces.",
    )
    compare.add_argument(
        "study", help="an honest preset with an _original variant, e.g. s3_accent_cnn"
    )
    compare.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="for both runs, e.g. data.root=/data/accent or train.seeds=[0,1] (YAML values)",
    )
    compare.add_argument(
        "--unseen",
        metavar="COLUMN",
        help="instead of STUDY_original: STUDY under K-fold CV twice, every COLUMN value "
        "(e.g. speaker) heard in training vs each held out; the table goes into both model cards",
    )
    compare.add_argument(
        "--folds",
        type=int,
        default=0,
        metavar="K",
        help="with --unseen: K folds (default: one per COLUMN value, at most 10)",
    )
    compare.add_argument(
        "--work",
        type=Path,
        default=Path(".tympan/protocols"),
        metavar="FOLDER",
        help="where each run's project folder goes (default: .tympan/protocols)",
    )
    compare.add_argument(
        "--dir",
        type=Path,
        default=Path("pipelines"),
        metavar="FOLDER",
        help="where the presets are (default: pipelines)",
    )
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
    alias = f"@{reg['alias']}" if reg["alias"] else "no alias"
    print(f"\nRegistered model: {reg['name']} version {reg['version']} -> {alias}")
    print(f"  {reg['reason']}")
    members = len(test["seeds"])
    if "cv" in test:
        folds = test["cv"]["folds"]
        print(
            f"Test metrics on {test['n_test']} clips, out of fold (ensemble of {members} members "
            f"({folds} folds x {members // folds} seeds); per-member mean +- std):"
        )
        column = "members"
    else:
        print(
            f"Test metrics on {test['n_test']} clips (ensemble of {members} seeds; "
            "per-seed mean +- std):"
        )
        column = "seeds"
    for key in ens:
        print(f"  {key:<18} {ens[key]:.4f}   {column} {mean[key]:.4f} +- {std[key]:.4f}")
    card = registered.parent / "model_card.md"
    if card.exists():
        print(f"Model card: {card} (also the version's description in mlflow ui)")
    activate = os.path.relpath(Path(sys.executable).parent / "activate")
    print("\nLook further (the commands need the project's environment on PATH):")
    print(f"  . {activate}")
    print(f"  mlflow ui --backend-store-uri {uri} --port 5001")
    if "experiment_id" in reg:  # MLflow 3.17 opens on its GenAI overview without workflowType
        from tympan.tracking import ui_url

        print(f"    then open {ui_url('http://127.0.0.1:5001', reg['experiment_id'])}")
    print("  dvc metrics show      dvc plots show   (then open dvc_plots/index.html)")
    keep = f"Experiment|test_{reg['metric']}|seed_|train\\.(lr|epochs)$"
    print(f"  dvc exp show --drop '.*' --keep '{keep}'")
    print(f"  MLFLOW_TRACKING_URI={uri} tympan serve -m models:/{reg['name']}@champion -p 5000")
    print(
        "  python -m tympan.serving.client data/demo/audio/tone_0000.wav "
        "--url http://127.0.0.1:5000/invocations"
    )


def _weights(action: str, names: list[str]) -> None:
    from tympan.models import weights

    for name in names:
        try:
            if action == "fetch":
                print(f"{name}: {weights.fetch(name)} (sha256 matches the published hash)")
                continue
            path = weights.cache_path(name)
            if path.is_file():
                weights.verify(path, weights.hash_prefix(weights.published_url(name)))
                print(f"{name}: {path} (present, sha256 matches the published hash)")
            else:
                print(f"{name}: {path} (missing; `tympan weights fetch {name}`)")
        except weights.WeightsError as exc:
            sys.exit(f"tympan weights: {exc}")


def _compare(args: argparse.Namespace) -> None:
    from tympan.compare import (
        by_value,
        compare,
        count_values,
        log_table,
        overridden,
        parse_override,
        study_runs,
        table,
        unseen_runs,
        write_cards,
    )

    study = args.study.removesuffix("_original")
    try:
        common = dict(parse_override(text) for text in args.overrides)
    except ValueError as exc:
        sys.exit(f"tympan compare-protocols: --set {exc}")
    work = args.work / (f"{study}-unseen-{args.unseen}" if args.unseen else study)
    try:
        if args.unseen:
            base = overridden(load_params(args.dir / f"{study}.yaml"), common, "--set")
            values = count_values(base, args.unseen, work / "values")
            folds = args.folds or min(values, 10)
            runs = unseen_runs(study, base, args.unseen, folds, values)
        else:
            runs = study_runs(study)
        rows = compare(runs, args.dir, work, common, study)
        text = table(rows)
        if args.unseen:
            text += f"\nBy {args.unseen}, out of fold ({rows[0]['metric']}):\n\n"
            text += by_value(rows, args.unseen)
            write_cards(rows, runs, args.dir, text, common)
    except _stage_errors() as exc:
        sys.exit(f"tympan compare-protocols: {exc}")
    (work / "protocols.md").write_text(text)
    experiment = load_params(args.dir / f"{study}.yaml").tracking.experiment
    name = f"compare-{study}" + (f"-unseen-{args.unseen}" if args.unseen else "")
    run_id = log_table(rows, text, experiment, name)
    cards = " and each run's model_card.md" if args.unseen else ""
    print(f"\n{text}\n(table: {work / 'protocols.md'}{cards}; MLflow run {run_id})")


def _use_preset(folder: Path, name: str, target: Path, force: bool = False) -> None:
    """Write preset `name` as the params file `target`: every key (so `dvc exp run -S KEY=...`
    finds each one), the preset's values over the defaults, comments kept for a preset that
    is already complete. An edited `target` is not overwritten without `force`; a `data.root`
    the user pointed elsewhere is kept when the new preset reads the same layout."""
    source = folder / f"{name}.yaml"
    if not source.exists():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        sys.exit(f"no preset {name!r} in {folder}/ (known: {known})")
    try:
        params = load_params(source)
    except ConfigError as exc:
        sys.exit(f"preset {name}: {exc}")
    kept = dropped = None  # the user's data.root: kept for the same layout, else replaced
    if target.exists():
        current, edits = _edits(folder, target)
        if current is not None and any(k == "data.root" for k, _, _ in edits):
            if current.data.adapter == params.data.adapter:
                kept = current.data.root if current.data.root != params.data.root else None
            else:
                dropped = f"{current.data.root} (a {current.data.adapter} dataset)"
        lost = [e for e in edits if e[0] != "data.root"]
        if (current is None or lost) and not force:
            sys.exit(_refusal(target, current, lost))
    text = source.read_text()
    raw = yaml.safe_load(text) or {}
    if not _complete(raw) or (kept is not None and not (text := _with_root(text, kept))):
        # an overlay on the defaults: every key written out, so DVC finds each param it tracks
        values = to_dict(params)
        if kept is not None:
            values["data"]["root"] = kept
        base = f" over {raw['extends']}" if "extends" in raw else ""
        text = (
            f"# preset {name}: {source}{base} over tympan's defaults (the comments are there).\n"
            f"# Generated by `tympan preset {name}`; edit freely or regenerate.\n"
            + yaml.safe_dump(values, sort_keys=False)
        )
    target.write_text(text)
    target_stage = "" if params.data.adapter == "demo" else " register"  # demo: its data too
    print(f"{target} is now preset {params.preset!r} ({source}).")
    if kept is not None:
        print(f"  kept your data.root: {kept} (the preset has {params.data.root})")
    if dropped is not None:
        print(f"  data.root is the preset's {params.data.root}, not your {dropped}")
    root = Path(kept or params.data.root)
    if params.data.adapter != "demo" and not root.exists():
        print(f"  data.root {root} does not exist yet: point it at your copy of the dataset")
    print(f"Build it with:\n  dvc repro{target_stage}")
    exp = f"dvc exp run -n {name.replace('_', '-')}{target_stage}"
    print(f"or as a DVC experiment:\n  {exp}")


def _keys(values: dict) -> dict[str, object]:
    """Flat `section.key` values of a params mapping, the search space as one value."""
    space = values.get("tune", {}).get("space")
    flat = flatten({k: v for k, v in values.items()})
    flat = {k: v for k, v in flat.items() if not k.startswith("tune.space.")}
    return {**flat, "tune.space": space}


def _complete(raw: dict) -> bool:
    """Whether a params mapping holds every key of the schema."""
    return set(_keys(to_dict(Params()))) <= set(_keys(raw))


def _edits(folder: Path, target: Path) -> tuple[Params | None, list[tuple[str, object, object]]]:
    """The params in `target` (None if it does not load) and its differences from the preset
    it names: `(key, its value, the preset's)`; every key differs from an unknown preset."""
    try:
        current = load_params(target)
    except ConfigError:
        return None, []
    mine = _keys(to_dict(current))
    origin = folder / f"{current.preset}.yaml"
    theirs = _keys(to_dict(load_params(origin))) if origin.exists() else {}
    return current, [(k, v, theirs.get(k)) for k, v in mine.items() if theirs.get(k, ...) != v]


def _refusal(target: Path, current: Params | None, lost: list) -> str:
    if current is None:
        return f"{target} does not load as a params file; `tympan preset ... --force` replaces it"
    shown = "; ".join(f"{k}: {v!r} (preset: {p!r})" for k, v, p in lost[:6])
    more = f" and {len(lost) - 6} more" if len(lost) > 6 else ""
    return (
        f"{target} has edits that preset {current.preset!r} does not hold, which this would "
        f"overwrite: {shown}{more}. Keep them as a preset (copy {target} to "
        f"pipelines/<name>.yaml and set `preset: <name>`), or run again with --force."
    )


def _with_root(text: str, root: str) -> str:
    """A complete preset's text with `data.root` set to `root`, comments kept ('' if the line
    is not where expected)."""
    import re

    found = re.search(r"^data:\n(?:(?:[ \t]+.*|[ \t]*)\n)*?([ \t]+)root:.*$", text, re.M)
    if found is None:
        return ""
    start = found.start(1)
    line_end = text.index("\n", start) if "\n" in text[start:] else len(text)
    replaced = f"{text[:start]}{found.group(1)}root: {json.dumps(root)}{text[line_end:]}"
    return replaced if (yaml.safe_load(replaced) or {})["data"]["root"] == root else ""


def quiet_mlflow() -> None:
    """MLflow's INFO lines off, and its artifact-download bars outside a terminal.

    MLflow configures its logger when it is first imported (level `MLFLOW_LOGGING_LEVEL`,
    default INFO), after this module set it, so the level goes through the environment, as
    does the bar switch (read at each download): child processes such as `tympan serve`'s
    workers follow. Either variable set by the user wins. Warnings stay.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "mlflow", "urllib3", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_mlflow()
    if args.command == "summary":
        _summary(args.registered, args.metrics)
        return
    if args.command == "preset":
        _use_preset(args.dir, args.name, args.params, args.force)
        return
    if args.command == "schema":
        from tympan.config import json_schema

        args.out.write_text(json.dumps(json_schema(), indent=1) + "\n")
        print(f"{args.out}: JSON Schema of the params files")
        return
    if args.command == "weights":
        _weights(args.action, args.names)
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
    if args.command == "repro":
        from tympan.project import ReproError, repro

        try:
            repro(params, args.targets, args.single_item, args.train_record)
        except ReproError as exc:
            sys.exit(f"tympan repro: {exc}")
        return
    from tympan import stages

    run = getattr(stages, f"run_{args.command}")
    paths = {k: v for k, v in vars(args).items() if k not in ("params", "verbose", "command")}
    if args.command == "tune" and not args.worker and None in (args.out, args.trials, args.summary):
        sys.exit("tympan tune: --out, --trials and --summary are required unless --worker")
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
