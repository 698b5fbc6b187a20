"""The ``bpfree`` command: thin argument parsing over ``config``, ``train``, ``studies`` and ``report``.

::

    bpfree train CONFIG.toml [--set KEY=VALUE ...] [--out DIR]
    bpfree train --resume RUN_DIR [--set train.max_steps=N ...]
    bpfree compare --task DATA/MODEL --estimators SPEC,SPEC,... [--budget steps=N|seconds=S|epochs=E]
                   [--lr SPEC_OR_NAME=LR ...] [--config FILE] [--set KEY=VALUE ...] [--out DIR]
    bpfree measure --task DATA/MODEL [--estimators SPEC,...] [--batch B] [--repeats R] [--out DIR]
    bpfree probe [--data NAME] [--estimators a,b] [--widths 64,256] [--depths 1,2] [--ks 1,4] [--out DIR]
    bpfree report RUN_OR_COMPARE_DIR... [--out DIR]
    bpfree sweep STUDY.toml [--preset NAME] [--storage URL] [--out DIR] [--n-trials N] [--workers N]
                 [--methods a,b] [--set KEY=VALUE ...] [--overwrite] [--report-only]

Every expected failure (unknown key, estimator, data set; an invalid value;
a missing data file; an existing output directory; a file that cannot be
read or written; a run too large for this machine's memory, or an allocation
that failed anyway) is printed as one line ``bpfree: error: ...`` to stderr
with exit status 2 and no traceback; ``--debug`` (anywhere on the command
line) shows the traceback instead. An unexpected exception is one line too,
with exit status 1 and a pointer to ``--debug``. SIGTERM (what ``timeout``,
SLURM, Kubernetes and ``docker stop`` send) is handled like Ctrl-C. ``train``
exits 0 when the run completed, 1 when it diverged or failed, 130 when
interrupted; ``compare`` and ``sweep`` exit 0 once their report is written (a
diverged run is a result), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Sequence

from bpfree import config as config_lib
from bpfree import data, estimators, models, paths, report, runs, train
from bpfree.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpfree", description="Train without backpropagation, measured against it.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (allowed anywhere)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,compare,measure,probe,study,sweep,report}")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set optimizer.lr=0.01 (value parsed as TOML when it can be)",
        )
        q.add_argument("--out", type=Path, help="output directory")
        q.add_argument("--overwrite", action="store_true", help="replace a run already in the output directory")
        q.add_argument(
            "--no-progress", action="store_true", help="no progress bar (same as --set train.progress=false)"
        )

    t = sub.add_parser("train", help="train one config and write its run directory")
    t.add_argument("config", type=Path, nargs="?", help="TOML config file (see configs/)")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a killed or interrupted run from its checkpoint (bit-identical on CPU); "
                   "--set may change only the budget and checkpointing")
    common(t)

    c = sub.add_parser(
        "compare",
        help="train several estimators on one task and write a report",
        description="Spec syntax: NAME[:KEY=VALUE]..., e.g. forward_gradient:num_directions=16:lr=1e-4 "
        "(see bpfree.studies.compare). Budget defaults to the config's, else epochs=1.",
        epilog=f"estimators: {', '.join(estimators.available())}; data: {', '.join(data.available())}; "
        f"models: {', '.join(models.available())}",
    )
    c.add_argument("--config", type=Path, help="base config; its [compare] table may list estimators and lr")
    c.add_argument("--task", help="DATA/MODEL, e.g. fashion_mnist/mlp (overrides the config's)")
    c.add_argument("--estimators", help="comma-separated estimator specs (default: the config's, else all)")
    c.add_argument("--budget", help="steps=N, seconds=S or epochs=E; comma-combine for whichever ends first")
    c.add_argument(
        "--lr", action="append", default=[], metavar="SPEC_OR_NAME=LR", help="learning rate of one estimator"
    )
    common(c)

    m = sub.add_parser(
        "measure",
        help="measure every estimator's step on one batch: ms, FLOPs, peak MB by category, cosine to the gradient",
        description="Spec syntax as for compare (NAME[:KEY=VALUE]...). Ratios are to the first spec.",
    )
    m.add_argument("--config", type=Path, help="base config (its data and model tables are used)")
    m.add_argument("--task", help="DATA/MODEL, e.g. fashion_mnist/mlp (overrides the config's)")
    m.add_argument("--estimators", help="comma-separated estimator specs (default: all registered)")
    m.add_argument("--batch", type=int, help="batch size (default: the config's data.batch_size)")
    m.add_argument("--repeats", type=int, default=20, help="interleaved timed repeats per estimator (default 20)")
    m.add_argument("--cosine-draws", type=int, default=10, help="estimates drawn for the cosine (default 10)")
    common(m)

    pr = sub.add_parser(
        "probe",
        help="sweep gradient quality over MLP width, depth and K, with plots",
        description="Cosine to the exact gradient, normalised variance and bias of each estimator on one "
        "batch, for ReLU MLPs of several widths and depths, beside the closed forms.",
    )
    pr.add_argument("--data", default="fashion_mnist", help="data set name (default fashion_mnist)")
    pr.add_argument("--estimators", default="forward_gradient,spsa,mezo", help="comma-separated estimator names")
    pr.add_argument("--widths", default="64,256,1024", help="hidden widths (default 64,256,1024)")
    pr.add_argument("--depths", default="1,2,4", help="numbers of hidden layers (default 1,2,4)")
    pr.add_argument("--ks", default="1,4,16", help="directions per step for estimators that take K (default 1,4,16)")
    pr.add_argument("--samples", type=int, default=20, help="estimates per cell (default 20)")
    pr.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", type=Path, help="output directory (default runs/probe-DATA)")

    st = sub.add_parser("study", help="run a shipped reproduction of a paper (bpfree study list)")
    st_sub = st.add_subparsers(dest="study_command", required=True, metavar="{list,run}")
    st_sub.add_parser("list", help="list the shipped studies and their presets")
    sr = st_sub.add_parser("run", help="run one study end to end (finished runs are reused: resumable)")
    sr.add_argument("name", help="study name, e.g. wang2025 (bpfree study list)")
    sr.add_argument("--preset", help="preset of the study file (default: the study's CPU preset)")
    sr.add_argument("--out", type=Path, help="output directory (default runs/NAME-PRESET)")
    sr.add_argument("--overwrite", action="store_true", help="redo finished runs instead of reusing them")
    sr.add_argument("--report-only", action="store_true", help="only rewrite the report from the saved results")

    r = sub.add_parser("report", help="rebuild report.md/report.html/PNGs from run or compare directories")
    r.add_argument("paths", type=Path, nargs="+", help="run directories or compare directories")
    r.add_argument("--out", type=Path, help="output directory (default: the directory given, or their common parent)")
    r.add_argument("--title", help="report title")

    sw = sub.add_parser(
        "sweep",
        help="tune every method of a study on its own (grid/TPE), re-run each best over seeds, report",
        description="Study file format, storage, resume and workers: docs/sweeps.md. Re-running the same "
        "command resumes a killed sweep; more workers join with the same --storage.",
    )
    sw.add_argument("study", type=Path, help="study TOML file, or the name of a shipped study (rike2024)")
    sw.add_argument("--preset", help="apply the study's [preset.NAME] (default: its study.default_preset)")
    sw.add_argument("--storage", help="optuna storage URL, e.g. postgresql://user:pw@host/db "
                    "(default: sqlite file OUT/sweep.db)")
    sw.add_argument("--n-trials", type=int, help="run at most N trials in this worker, then stop")
    sw.add_argument("--workers", type=int, default=1, help="local worker processes sharing the storage (default 1)")
    sw.add_argument("--methods", help="comma-separated method names to work on (default: all)")
    sw.add_argument("--report-only", action="store_true", help="rebuild sweep.json and the report; train nothing")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a base config key for every method, e.g. --set train.device=cuda")
    sw.add_argument("--out", type=Path, help="output directory (default runs/sweep-STUDY[-PRESET])")
    sw.add_argument("--overwrite", action="store_true", help="delete the default SQLite storage and runs first")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bpfree`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    previous = _sigterm_as_interrupt()
    try:
        commands = {"train": _train, "compare": _compare, "measure": _measure, "probe": _probe, "study": _study,
                    "sweep": _sweep, "report": _report}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("bpfree: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        status, message = describe_error(e)
        print(f"bpfree: error: {message}", file=sys.stderr)
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt():
    """SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C (main thread only); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


# Failures in what the user asked for or in the machine's resources: exit status 2, one line.
EXPECTED_ERRORS = (ConfigError, ValueError, data.DatasetNotFoundError, runs.RunExistsError, runs.RunBusyError,
                   OSError, MemoryError, LookupError)


def describe_error(e: BaseException) -> tuple[int, str]:
    """``(exit status, one-line message)`` for an exception reaching the command line."""
    import torch

    from bpfree import limits

    if limits.is_out_of_memory(e):
        return 2, (f"out of memory ({_one_line(e)}); {limits.format_bytes(limits.available_bytes())} available now: "
                   "make the run smaller (data, batch, estimator.num_directions, model)")
    if isinstance(e, OSError) and not isinstance(e, runs.RunExistsError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        what = {IsADirectoryError: "is a directory, a file is needed", NotADirectoryError: "a file is in the way "
                "of a directory", FileExistsError: "exists and is not a directory", PermissionError: "permission denied"}
        kind = next((v for k, v in what.items() if isinstance(e, k)), e.strerror)
        return 2, f"{kind}{where}"
    if isinstance(e, EXPECTED_ERRORS) and not isinstance(e, torch.OutOfMemoryError):
        return 2, _one_line(e)
    return 1, f"internal error: {type(e).__name__}: {_one_line(e)} (run again with --debug for the traceback)"


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def _not_empty(args: argparse.Namespace, *names: str) -> None:
    """An option given as an empty string is an error, never silently the default."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not str(value).strip(" ,"):
            raise ConfigError(f"--{name.replace('_', '-')} is empty; give a value or leave the option out")


def _at_least(args: argparse.Namespace, name: str, low: int) -> None:
    value = getattr(args, name, None)
    if value is not None and value < low:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _overrides(args: argparse.Namespace) -> list[str]:
    return list(args.overrides) + (["train.progress=false"] if args.no_progress else [])


def _train(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.resume is None):
        raise ConfigError("bpfree train takes either CONFIG (a new run) or --resume RUN_DIR (continue one)")
    if args.resume is not None:
        if args.out is not None or args.overwrite:
            raise ConfigError("--resume continues RUN_DIR in place; it takes no --out or --overwrite")
        out = args.resume
    else:
        cfg = config_lib.resolve(config_lib.load(args.config, _overrides(args)))
        out = args.out or Path(cfg.run.out) / cfg.run.name
    try:
        summary = train.resume(out, _overrides(args)) if args.resume else train.run(cfg, out, overwrite=args.overwrite)
    except estimators.UnsupportedModelError as e:
        print(f"bpfree: error: {_one_line(e)} (run record in {out})", file=sys.stderr)
        return 1
    print(f"{out}: {summary['status']}, {summary['steps']} steps, {_accuracy(summary)}")
    if summary.get("reason"):
        print(f"  {summary['reason']}")
    return {"completed": 0, "interrupted": 130}.get(summary["status"], 1)


def _accuracy(summary: dict) -> str:
    acc = summary.get("final_val_accuracy")
    test = summary.get("final_test_accuracy")
    fmt = lambda v: "—" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    return f"val acc {fmt(acc)}, test acc {fmt(test)}"


def _task_config(args: argparse.Namespace) -> config_lib.Config:
    """The base config of ``compare`` / ``measure``: ``--config``, then ``--task``, then ``--set``."""
    raw: dict = {}
    if args.config is not None:
        base = config_lib.load(args.config)
        raw = config_lib.to_dict(base)
    if args.task is not None:
        data_name, sep, model_name = args.task.partition("/")
        if not sep or not data_name or not model_name:
            raise ConfigError(f"--task expects DATA/MODEL (e.g. fashion_mnist/mlp), got {args.task!r}")
        raw.setdefault("data", {})["name"] = data_name
        raw.setdefault("model", {})["name"] = model_name
    elif args.config is None:
        raise ConfigError("give --task DATA/MODEL (e.g. synthetic/mlp) or --config FILE")
    raw = config_lib.apply_overrides(raw, _overrides(args))
    return config_lib.from_dict(raw, origin=str(args.config or "--task"))


def _compare(args: argparse.Namespace) -> int:
    from bpfree.studies import compare

    base = _task_config(args)
    _not_empty(args, "budget", "estimators")
    if args.budget is not None:
        budget = compare.parse_budget(args.budget)
    elif all(getattr(base.train, k) is None for k in ("epochs", "max_steps", "max_seconds")):
        budget = compare.parse_budget("epochs=1")
    else:
        budget = {}
    base = config_lib.updated(base, budget, origin="--budget")
    specs_text = args.estimators or list(base.compare.estimators) or estimators.available()
    specs = compare.parse_specs(specs_text)
    lrs = {}
    for item in args.lr:
        key, sep, value = item.partition("=")
        lr = config_lib.parse_value(value.strip())
        if not sep or isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise ConfigError(f"--lr expects SPEC_OR_NAME=NUMBER (e.g. forward_gradient=1e-4), got {item!r}")
        lrs[key.strip()] = float(lr)
    out = args.out or Path(base.run.out) / f"compare-{base.data.name}-{base.model.name}"
    record = compare.run(base, specs, out, lrs=lrs, overwrite=args.overwrite)
    print(f"report: {record['report']['html']}")
    print(f"        {record['report']['markdown']}")
    interrupted = any(r["status"] == "interrupted" for r in record["runs"])
    return 130 if interrupted else 0


def _measure(args: argparse.Namespace) -> int:
    from bpfree.studies import compare
    from bpfree.studies.measure import run_measure

    _not_empty(args, "estimators")
    for name in ("batch", "repeats", "cosine_draws"):
        _at_least(args, name, 1)
    base = _task_config(args)
    specs = compare.parse_specs(args.estimators or list(base.compare.estimators) or estimators.available())
    out = args.out or Path(base.run.out) / f"measure-{base.data.name}-{base.model.name}"
    paths.check_output_dir(out, "measure", ["measure.json"])
    run_measure(base, specs, out, batch=args.batch, repeats=args.repeats, cosine_draws=args.cosine_draws)
    print((out / "measure.md").read_text())
    print(f"written: {out / 'measure.md'}, measure.json, measure.csv")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from bpfree.studies.probe import ProbeConfig, run_probe

    def ints(text: str, what: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise ConfigError(f"--{what} expects comma-separated integers >= 1, got {text!r}")
        return values

    _at_least(args, "samples", 2)
    _at_least(args, "batch", 1)
    names = tuple(n.strip() for n in args.estimators.split(",") if n.strip())
    if not names:
        raise ConfigError(f"--estimators expects comma-separated estimator names, got {args.estimators!r}")
    for n in names:
        try:
            estimators.option_names(n)
        except ValueError as e:  # unknown name: the message lists the valid ones
            raise ConfigError(str(e)) from None
    cfg = ProbeConfig(data=args.data, estimators=names, widths=ints(args.widths, "widths"),
                      depths=ints(args.depths, "depths"), ks=ints(args.ks, "ks"), samples=args.samples,
                      batch=args.batch, seed=args.seed)
    out = args.out or Path("runs") / f"probe-{args.data}"
    paths.check_output_dir(out, "probe", ["probe.json"])
    run_probe(cfg, out)
    print((out / "probe.md").read_text())
    print(f"written: {out}/probe.md, probe.csv, probe.json and PNG plots")
    return 0


def _study(args: argparse.Namespace) -> int:
    import importlib

    from bpfree import studies

    if args.study_command == "list":
        for name in studies.available():
            module, what, default = studies.STUDIES[name]
            names = ", ".join(sorted(importlib.import_module(module).presets()))
            print(f"{name}: {what}\n    presets: {names} (default {default})")
        return 0
    _not_empty(args, "preset")
    preset = args.preset or studies.STUDIES.get(args.name, ("", "", ""))[2]
    out = args.out or Path("runs") / f"{args.name}-{preset}"
    paths.check_output_dir(out, "study", ["study.json", "sweep.json", "sweep.db"])
    if args.report_only:
        record = studies.rebuild_report(args.name, out, args.preset)
    else:
        record = studies.run_study(args.name, args.preset, out, overwrite=args.overwrite)
    print(f"report: {out / record['report']['html']}")
    return 0


# what marks a directory as bpfree's for `bpfree report --out`: any run, compare, sweep or study record
REPORT_MARKERS = ("report.md", "report.html", "summary.json", "compare.json", "sweep.json", "study.json")


def _report(args: argparse.Namespace) -> int:
    if args.out is not None:
        paths.check_output_dir(args.out, "report", REPORT_MARKERS)
    written = report.build(args.paths, args.out, title=args.title)
    print(f"report: {written['html']}")
    print(f"        {written['markdown']}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import subprocess

    from bpfree.studies import sweep

    _not_empty(args, "methods", "preset", "storage")
    study = sweep.load_study(args.study, preset=args.preset, overrides=args.overrides)
    out = args.out or Path("runs") / ("sweep-" + study.name + (f"-{study.preset}" if study.preset else ""))
    if args.report_only:
        results = sweep.report_only(study, out, storage=args.storage)
    else:
        if args.workers < 1 or (args.n_trials is not None and args.n_trials < 1):
            raise ConfigError("--workers and --n-trials must be >= 1")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        helpers = []
        if args.workers > 1:  # the others join the same storage; this process is worker 1
            storage = args.storage or sweep.default_storage(out)
            if args.overwrite:
                if args.storage:
                    raise ConfigError("--overwrite only clears the default SQLite storage; delete remote studies yourself")
                sweep.clear(study, out)
            argv = [sys.executable, "-m", "bpfree.cli", "sweep", str(args.study), "--out", str(out),
                    "--storage", storage, *(["--preset", study.preset] if study.preset else []),
                    *(f"--set={o}" for o in args.overrides), *(["--methods", args.methods] if args.methods else []),
                    *(["--n-trials", str(args.n_trials)] if args.n_trials else [])]
            out.mkdir(parents=True, exist_ok=True)
            helpers = [subprocess.Popen(argv) for _ in range(args.workers - 1)]
        try:
            results = sweep.run(study, out, storage=args.storage, methods=methods, n_trials=args.n_trials,
                                overwrite=args.overwrite and not helpers)
        finally:
            for h in helpers:
                h.wait()
        failed = [h.returncode for h in helpers if h.returncode != 0]
        if failed:  # their own errors are on stderr above
            print(f"bpfree: error: {len(failed)} of {len(helpers)} extra workers failed (exit codes {failed})",
                  file=sys.stderr)
            return 1
    print(f"report: {results['report']['html']}")
    print(f"        {results['report']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
