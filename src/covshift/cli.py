"""``covshift``: a thin command line over the library.

    covshift list                          the experiments, one line each
    covshift run fig1 [--steps 2000 ...]   train, measure, write a run directory with a report
    covshift report RUN_DIR                rebuild figures and report.html from saved metrics

Every error is one line on stderr and exit code 2; an interrupted run exits 130 after saving.
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


def _build_parser() -> argparse.ArgumentParser:
    from covshift.experiments.config import config_fields

    parser = _Parser(prog="covshift", description="Batch Normalization and internal covariate shift, measured.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("list", help="list the experiments")
    run = sub.add_parser("run", help="run an experiment", argument_default=argparse.SUPPRESS)
    run.add_argument("experiment", help="experiment name (see `covshift list`)")
    for name, hint, help_text in config_fields():
        flag = "--" + name.replace("_", "-")
        if hint is bool:
            run.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            run.add_argument(flag, dest=name, metavar=metavar, help=help_text)
    report = sub.add_parser("report", help="rebuild figures and report.html of a run directory")
    report.add_argument("run_dir", help="a run directory written by `covshift run`")
    return parser


def _progress_bars(arms: Sequence[str], steps: int, enabled: bool):
    """A tqdm bar per arm (with ETA, loss and accuracy), fed by the runner's progress callback."""
    from tqdm.auto import tqdm

    bars = {arm: tqdm(total=steps, desc=f"{arm:>6s}", position=i, unit="step", dynamic_ncols=True, disable=not enabled, leave=True) for i, arm in enumerate(arms)}
    last_acc: dict[str, Optional[float]] = {arm: None for arm in arms}

    def update(arm: str, step: int, loss: float, acc: Optional[float]) -> None:
        bar = bars[arm]
        if acc is not None:
            last_acc[arm] = acc
        bar.update(step - bar.n)
        post = {"loss": f"{loss:.4f}"}
        if last_acc[arm] is not None:
            post["test_acc"] = f"{last_acc[arm]:.4f}"
        bar.set_postfix(post, refresh=False)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def _print_summary(summary: dict[str, Any]) -> None:
    rows = summary.get("table", [])
    if not rows:
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)))
    for line in summary.get("headlines", []):
        print(line)


def _cmd_list() -> int:
    from covshift.experiments.registry import EXPERIMENTS

    width = max(map(len, EXPERIMENTS))
    for name, exp in EXPERIMENTS.items():
        print(f"{name:<{width}}  {exp.summary}")
    return 0


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from covshift.experiments.config import apply_overrides
    from covshift.experiments.registry import get_experiment
    from covshift.experiments.runner import run_experiment

    exp = get_experiment(args.experiment)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "experiment", "version")}
    config = apply_overrides(exp.config, overrides)
    update, close = _progress_bars(list(exp.arms), config.steps, config.progress and sys.stderr.isatty())
    try:
        result = run_experiment(exp.name, config, progress=update, argv=["covshift", *argv])
    finally:
        close()
    _print_summary(result.summary)
    print(f"run directory: {result.run_dir}  (report: {result.run_dir / 'report.html'}, {result.seconds:.0f} s)")
    if result.status == "interrupted":
        print(f"interrupted: what was measured is saved; `covshift report {result.run_dir}` rebuilds the report", file=sys.stderr)
        return 130
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from covshift.experiments.report import build_report

    summary = build_report(args.run_dir)
    _print_summary(summary)
    print(f"report: {args.run_dir}/report.html")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from covshift.experiments.config import ConfigError
    from covshift.experiments.data import DataError
    from covshift.experiments.report import ReportError
    from covshift.experiments.runner import RunDirError

    try:
        args = _build_parser().parse_args(argv)
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
        raise CLIError("a command is required: list, run or report (see `covshift --help`)")
    except (CLIError, ConfigError, DataError, ReportError, RunDirError) as e:
        print(f"covshift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covshift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
