"""``covshift``: a thin command line over the library.

    covshift list                          the experiments: paper and question, one line each
    covshift run EXP [--steps 2000 ...]    run (or resume) the units, write a run directory with a report
    covshift report RUN_DIR                rebuild figures and report.html from whatever units are there
    covshift export RUN_DIR                write the run's numbers and figures to docs/results/ and docs/images/

Every field of the experiment's config is a flag of ``run``; a field that an arm or a sweep owns
is rejected, naming the arm, and so is one that the experiment never reads (``Experiment.reads``;
``covshift run EXP --help`` lists only the options that apply). Every error is one line on stderr and exit code 2; an interrupted
run exits 130 after saving.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any, Optional, Sequence

__all__ = ["main"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage + message; we print one line
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def _experiment(argv: Sequence[str]):
    """The experiment named after ``run`` (its config's fields are the flags), or ``None``."""
    from covshift.experiments.registry import get_experiment

    if len(argv) >= 2 and argv[0] == "run" and not argv[1].startswith("-"):
        return get_experiment(argv[1])
    return None


def _build_parser(exp=None) -> argparse.ArgumentParser:
    from covshift.experiments.config import ExperimentConfig, config_fields

    parser = _Parser(prog="covshift", description="Batch Normalization and internal covariate shift, measured.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("list", help="list the experiments")
    # An experiment's options that it never reads stay parseable (so that giving one is a clear
    # error from check_overrides) but are left out of its --help, which names them at the end.
    ignored = exp.ignored_fields() if exp is not None else ()
    epilog = f"options that do nothing in {exp.name} (rejected): " + ", ".join("--" + f.replace("_", "-") for f in ignored) if ignored else None
    run = sub.add_parser("run", help="run an experiment (an existing --out is resumed)", argument_default=argparse.SUPPRESS, epilog=epilog)
    run.add_argument("experiment", help="experiment name (see `covshift list`)")
    for name, hint, help_text in config_fields(type(exp.config) if exp is not None else ExperimentConfig):
        flag = "--" + name.replace("_", "-")
        help_text = argparse.SUPPRESS if name in ignored else help_text
        if hint is bool:
            run.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            run.add_argument(flag, dest=name, metavar=metavar, help=help_text)
    report = sub.add_parser("report", help="rebuild figures and report.html of a run directory")
    report.add_argument("run_dir", help="a run directory written by `covshift run`")
    export = sub.add_parser("export", help="write a run's numbers (docs/results/NAME.md, .json) and figures (docs/images/)")
    export.add_argument("run_dir", help="a run directory written by `covshift run`")
    export.add_argument("--name", help="file stem (default: the experiment's name)")
    export.add_argument("--docs", default="docs", help="the docs directory (default: docs)")
    export.add_argument("--command", dest="run_command", help="the command that produced the run, written into the files")
    export.add_argument("--wall", type=float, help="wall time of that command in seconds, recorded beside the numbers")
    export.add_argument("--image-prefix", help="prefix of the figures copied to docs/images/ (default: NAME_)")
    return parser


def _progress_bars(labels: Sequence[str], steps: int, enabled: bool):
    """A tqdm bar per unit (with ETA, loss and accuracy), fed by the runner's progress callback."""
    from tqdm.auto import tqdm

    bars = {lab: tqdm(total=steps, desc=f"{lab:>14s}", position=i, unit="step", dynamic_ncols=True, disable=not enabled, leave=True) for i, lab in enumerate(labels)}
    last_acc: dict[str, Optional[float]] = {}

    def update(unit, step: int, total: int, loss: Optional[float], acc: Optional[float]) -> None:
        bar = bars.get(str(unit))
        if bar is None:
            return
        if acc is not None:
            last_acc[str(unit)] = acc
        bar.total = total
        bar.update(step - bar.n)
        post = {"loss": f"{loss:.4f}"} if loss is not None else {}
        if last_acc.get(str(unit)) is not None:
            post["test_acc"] = f"{last_acc[str(unit)]:.4f}"
        bar.set_postfix(post, refresh=False)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def _print_summary(summary: dict[str, Any]) -> None:
    rows = summary.get("table", [])
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        widths = [max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys]
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for r in rows:
            print("  ".join(str(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)))
    for line in summary.get("headlines", []):
        print(line)


def _cmd_list() -> int:
    from covshift.experiments.registry import experiments

    exps = experiments()
    width = max(len(e.name) for e in exps)
    for e in exps:
        print(f"{e.name:<{width}}  {e.paper}: {e.question}" if e.paper else f"{e.name:<{width}}  {e.summary}")
    return 0


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from covshift.experiments.config import apply_overrides
    from covshift.experiments.registry import get_experiment
    from covshift.experiments.runner import run_experiment

    exp = get_experiment(args.experiment)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "experiment", "version")}
    exp.check_overrides(overrides)
    config = apply_overrides(exp.config, overrides)
    labels = [str(u) for u in exp.units(config)]
    update, close = _progress_bars(labels, config.steps, config.progress and sys.stderr.isatty() and config.executor == "local")
    try:
        result = run_experiment(exp.name, config, progress=update, argv=["covshift", *argv], notify=lambda m: print(f"covshift: {m}", file=sys.stderr))
    finally:
        close()
    _print_summary(result.summary)
    print(f"run directory: {result.run_dir}  (report: {result.run_dir / 'report.html'}, {result.seconds:.0f} s)")
    if result.status == "interrupted":
        print(f"interrupted: what was measured is saved; `covshift run {exp.name} --out {result.run_dir}` resumes, `covshift report {result.run_dir}` rebuilds the report", file=sys.stderr)
        return 130
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from covshift.experiments.report import build_report

    summary = build_report(args.run_dir)
    _print_summary(summary)
    print(f"report: {args.run_dir}/report.html")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from covshift.experiments.export import export_run

    written = export_run(args.run_dir, docs=args.docs, name=args.name, command=args.run_command, wall_seconds=args.wall, image_prefix=args.image_prefix)
    for p in written:
        print(p)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from covshift.experiments.config import ConfigError
    from covshift.experiments.data import DataError
    from covshift.experiments.executors import UnitFailed
    from covshift.experiments.report import ReportError
    from covshift.experiments.runner import RunDirError

    try:
        args = _build_parser(_experiment(argv)).parse_args(argv)
        if args.version:
            import covshift

            print(f"covshift {covshift.__version__}")
            return 0
        if args.command == "list":
            return _cmd_list()
        if args.command == "run":
            return _cmd_run(args, argv)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "export":
            return _cmd_export(args)
        raise CLIError("a command is required: list, run, report or export (see `covshift --help`)")
    except (CLIError, ConfigError, DataError, ReportError, RunDirError) as e:
        print(f"covshift: error: {e}", file=sys.stderr)
        return 2
    except UnitFailed as e:
        print(f"covshift: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("covshift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
