"""The ``clipn`` command line (also ``python -m jobs``). Flags are derived from the pydantic config models,
never listed by hand.

``clipn score --config score.yaml --set runtime.batch_size=32 --output.uri s3://b/out``:
the YAML file, then ``--set`` pairs, then per-field flags fill one config dict, which
the job's config model validates before any Ray work. Values are parsed as YAML
scalars (``true``, ``3``, ``[a, b]``). A bad config prints one line per field at fault
and exits 2; a setup error (missing input, bad checkpoint, ...) prints one line, exits 1; a scoring run
whose night another live run holds prints one line naming that run and exits 75 (``EX_TEMPFAIL``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from schemas.calibrate_config import CalibrateJobConfig
from schemas.eval_config import EvalJobConfig
from schemas.history_config import HistoryJobConfig
from schemas.import_config import ImportJobConfig, UpgradeCheckpointConfig
from schemas.review_config import ReviewConfig
from schemas.score_config import ScoreJobConfig
from schemas.train_config import TrainJobConfig


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, FieldInfo) of every non-model field, recursing into nested config models."""
    out = []
    for name, info in model.model_fields.items():
        tp = info.annotation
        args = [a for a in typing.get_args(tp) if a is not type(None)] if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else []
        nested = tp if _is_model(tp) else (args[0] if len(args) == 1 and _is_model(args[0]) else None)
        if nested is not None:
            out += leaf_fields(nested, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", info))
    return out


def _set_dotted(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise SystemExit(f"config error: {dotted}: parent is not a mapping")
    d[leaf] = value


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_config_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """``--config``, ``--set`` and one ``--a.b`` flag per leaf field of ``model``."""
    parser.add_argument("--config", type=Path, help="YAML (or JSON) config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. runtime.batch_size=32 (repeatable)")
    group = parser.add_argument_group("config fields (see also --config)")
    for dotted, info in leaf_fields(model):
        default = "required" if info.is_required() else f"default: {info.get_default(call_default_factory=True)!r}"
        # --run-date as well as --run_date: people type hyphens
        aliases = [f"--{dotted.replace('_', '-')}"] if "_" in dotted else []
        flag = {"nargs": "?", "const": "true"} if info.annotation is bool else {}  # a bare --check means true
        group.add_argument(f"--{dotted}", *aliases, dest=f"field:{dotted}", metavar="VALUE", default=argparse.SUPPRESS,
                           # argparse %-formats help: a % in a description ("5 % quantiles") must be doubled
                           help=f"{info.description or ''} ({default})".replace("%", "%%"), **flag)


def build_config(model: type[BaseModel], args: argparse.Namespace):
    """Validated config from --config, then --set, then field flags; SystemExit(2) with one line per error."""
    data: dict = {}
    if args.config:
        try:
            loaded = yaml.safe_load(args.config.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {args.config}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {args.config}: expected a mapping at the top level")
        data = loaded
    for pair in args.set:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        _set_dotted(data, key.strip(), _parse_value(value))
    for key, value in vars(args).items():
        if key.startswith("field:"):
            _set_dotted(data, key[len("field:"):], _parse_value(value))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise ConfigError("; ".join(lines)) from None


class ConfigError(ValueError):
    """A config that does not validate; the message names every field at fault."""


def _score(args) -> int:
    from jobs.score import run

    cfg = build_config(ScoreJobConfig, args)
    manifest = run(cfg)
    print(f"published {manifest.partition}: {manifest.rows} rows, by status {manifest.by_status}, "
          f"OOD rate {manifest.ood_rate}")
    return 0


def _train(args) -> int:
    from jobs.train import run

    cfg = build_config(TrainJobConfig, args)
    summary = run(cfg)
    last = summary.get("last") or {}
    print(f"trained {summary.get('steps')} steps ({summary.get('restarts', 0)} restart(s), "
          f"{summary.get('skipped_pairs', 0)} pairs skipped), final loss {last.get('loss', float('nan')):.4f}; "
          f"checkpoint {summary.get('checkpoint')} (model id {str(summary.get('model_id'))[:16]}), run {summary['run_path']}")
    return 0


def _evaluate(args) -> int:
    from jobs.evaluation.evaluate import run

    cfg = build_config(EvalJobConfig, args)
    report = run(cfg)
    best = ", ".join(f"{k} {v.auroc:.1f}" for k, v in report.scores.items())
    print(f"evaluated {report.data.id} ID + {report.data.ood} OOD images at logit scale {report.logit_scale:g}; "
          f"AUROC {best}; report {cfg.output.dir.rstrip('/')}/report.md")
    if report.splits:
        from jobs.evaluation.report import split_table

        print("\n".join(split_table(report)))
    return 0


def _calibrate(args) -> int:
    from jobs.evaluation.calibrate import run

    cfg = build_config(CalibrateJobConfig, args)
    report = run(cfg)
    d = report.decision
    print(f"calibrated {report.sample.images} ID images (calibration {report.id}); {d['score']} >= {d['threshold']:.6g} "
          f"keeps {cfg.decision_target:.1%}; decision block {cfg.output.dir.rstrip('/')}/decision.yaml")
    return 0


def _import_original(args) -> int:
    from jobs.import_original import run

    result = run(build_config(ImportJobConfig, args))
    print(f"wrote {result.checkpoint} (model id {result.model_id[:16]}, K={result.num_prompts}, "
          f"logit scale {result.logit_scale:.2f}); score with --model.checkpoint {result.checkpoint}")
    return 0


def _upgrade_checkpoint(args) -> int:
    from jobs.upgrade_checkpoint import run

    result = run(build_config(UpgradeCheckpointConfig, args))
    print(f"wrote {result.checkpoint} (model id {result.model_id[:16]}, built as {result.pretrained_config}, "
          f"{'QuickGELU' if result.quick_gelu else 'GELU'}); score with --model.checkpoint {result.checkpoint}")
    return 0


def _review(args) -> int:
    from jobs.review import run

    page = run(build_config(ReviewConfig, args))
    print(f"wrote {page.path}: {', '.join(f'{k} {v}' for k, v in page.sections.items())} images, "
          f"{page.unreadable} unreadable now")
    return 0


def _history(args) -> int:
    from jobs.history import run
    from jobs.history.table import format_table

    cfg = build_config(HistoryJobConfig, args)
    history = run(cfg)
    print(format_table(history.nights, cfg.score))
    if cfg.plot:
        print(f"plot: {cfg.plot}")
    for line in history.findings or []:
        print(f"drift: {line}")
    return 1 if history.findings else 0


def _demo(args) -> int:
    from jobs.demo import FULL, SMALL, run_demo

    run_demo(Path(args.out), endpoint=args.endpoint, size=SMALL if args.small else FULL,
             cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    return 0


def _job_errors() -> tuple[type[Exception], ...]:
    from jobs.train import TrainDataError, TrainingError

    return (TrainingError, TrainDataError)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipn", description="CLIPN zero-shot OOD filter for image data lakes")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score images from object storage, write OOD flags as Parquet",
                           description=ScoreJobConfig.__doc__)
    add_config_arguments(score, ScoreJobConfig)
    score.set_defaults(func=_score)
    train = sub.add_parser("train", help="train the no tower on image-text pairs with Ray Train",
                           description=TrainJobConfig.__doc__)
    add_config_arguments(train, TrainJobConfig)
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("evaluate", help="AUROC/FPR95/AUPR, ID accuracy and CTW/ATD rates on labelled ID/OOD images",
                              description=EvalJobConfig.__doc__)
    add_config_arguments(evaluate, EvalJobConfig)
    evaluate.set_defaults(func=_evaluate)
    calibrate = sub.add_parser("calibrate", help="thresholds that keep target shares of ID images, from an ID sample",
                               description=CalibrateJobConfig.__doc__)
    add_config_arguments(calibrate, CalibrateJobConfig)
    calibrate.set_defaults(func=_calibrate)
    importer = sub.add_parser("import-original", help="released CLIPN weights (.pt) -> a checkpoint the nightly job loads",
                              description=ImportJobConfig.__doc__)
    add_config_arguments(importer, ImportJobConfig)
    importer.set_defaults(func=_import_original)
    upgrade = sub.add_parser("upgrade-checkpoint", help="re-save a checkpoint built as its base weights were trained "
                             "(QuickGELU for OpenAI's)", description=UpgradeCheckpointConfig.__doc__)
    add_config_arguments(upgrade, UpgradeCheckpointConfig)
    upgrade.set_defaults(func=_upgrade_checkpoint)
    review = sub.add_parser("review", help="a static HTML page of a scored night: most OOD, borderline and kept "
                            "images with thumbnails, by predicted class", description=ReviewConfig.__doc__)
    add_config_arguments(review, ReviewConfig)
    review.set_defaults(func=_review)
    history = sub.add_parser("history", help="one line per night of an output, a plot, and a drift check of the "
                             "latest night (exit 1 on a finding)", description=HistoryJobConfig.__doc__)
    add_config_arguments(history, HistoryJobConfig)
    history.set_defaults(func=_history)
    demo = sub.add_parser("demo", help="the whole product on a generated world: train, score a lake, evaluate (local Ray)")
    demo.add_argument("--out", default="demo_out", help="local folder for the scores, the report, configs and the cache")
    demo.add_argument("--endpoint", default=None,
                      help="an existing S3-compatible endpoint (e.g. MinIO at http://127.0.0.1:9000); default: moto on loopback")
    demo.add_argument("--cache-dir", default=None, help="where the trained tiny base CLIP is cached (default: <out>/cache)")
    demo.add_argument("--small", action="store_true", help="the reduced demo of the tests: same training, 40 lake and 350 evaluation images")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # our own lines at INFO; libraries (open_clip, botocore) only when they warn, unless --verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("clipn").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from clipn_core.errors import ClipnError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ClipnError, *_job_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)  # 75 for a night another live run holds (LeaseHeldError)

