"""The ``fedlora`` command line (front end): ``fedlora run``, ``fedlora compare`` and ``fedlora study``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path


def _methods() -> list[str]:
    from fedlora.federation import method_names

    return method_names()


def _fields():
    from fedlora.app.config import RunConfig

    return [f for f in RunConfig.fields() if f.name != "out"]


def _method_help() -> str:
    from fedlora.federation import REGISTRY

    return "aggregation method: " + ", ".join(
        f"{n}{' (mixed ranks)' if c.mixed_ranks else ''}" for n, c in REGISTRY.items()
    ) + " (default florana)"


def _add_run_flags(p: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    """One flag per setting (its help and default from the setting's declaration, grouped by the part that owns it), and
    one per declared method option. Every flag defaults to "not given" so a --config file's values survive unless the
    flag is passed."""
    from fedlora.app.config import PARTS, base_type
    from fedlora.federation.protocol import option_flags

    for part, cls in PARTS.items():
        group = p.add_argument_group(f"{part} settings", (cls.__doc__ or "").strip().splitlines()[0])
        for f in dataclasses.fields(cls):
            if f.name == "out" or (f.name == "method" and not with_method):
                continue
            flag = f"--{f.name.replace('_', '-')}"
            default = "" if f.default is None else f" (default {f.default})" if f.default != "" else ""
            help_ = _method_help() if f.name == "method" else f.metadata["help"] + default
            typ = base_type(f.name)
            if typ is bool:
                group.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_)
            else:
                group.add_argument(flag, type=typ, default=None, help=help_)
    options = p.add_argument_group("method options", "each method's own options (also as --method-options NAME-OPTION=VALUE)")
    for flag, (method, _, decl) in option_flags().items():
        choices = f": {', '.join(map(str, decl.choices))}" if decl.choices else ""
        options.add_argument(f"--{flag}", default=None, dest=f"option:{flag}", metavar="VALUE", help=f"{method}: {decl.help}{choices} (default {decl.default})")
    p.add_argument("--config", default=None, help="TOML file with run settings (flags override it)")
    p.add_argument("--preset", default=None, help="named settings of a standard setup: flowertune-nlp, dolly-category "
                   "(docs/instruct.md; --config and flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _given(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in _fields() if getattr(args, f.name, None) is not None}


def _config_from(args: argparse.Namespace, **extra):
    from fedlora.app.config import RunConfig

    given = _given(args)
    options = [f"{k.removeprefix('option:')}={v}" for k, v in vars(args).items() if k.startswith("option:") and v is not None]
    if options:
        given["method_options"] = ",".join(filter(None, [given.get("method_options", ""), *options]))
    given |= extra
    if getattr(args, "preset", None):
        from fedlora.app.presets import preset

        given = preset(args.preset) | (RunConfig.from_toml(args.config).given_only() if args.config else {}) | given
        return RunConfig(**given).with_absolute_paths()
    if args.config:
        return RunConfig.from_toml(args.config, **given).with_absolute_paths()
    return RunConfig(**given).with_absolute_paths()


class _Progress:
    """A rich progress bar over rounds × clients, plus one line of key metrics per round."""

    def __init__(self, total_steps: int, label: str, quiet: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, disable=quiet,
        )
        self.task = self.progress.add_task(label, total=total_steps)
        self.label = label

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.progress.__exit__(*exc)

    started = False
    trained = answered = 0

    def _start(self) -> None:
        if not self.started:  # shown once training starts: loading errors print alone, on one line
            self.progress.__enter__()
            self.started = True

    def client(self, rnd: int, cid: int) -> None:
        self._start()
        self.progress.advance(self.task)

    def work(self, kind: str, n: int) -> None:
        """Causal-LM runs: examples trained and prompts answered so far, next to the bar (a client takes a while)."""
        self._start()
        if kind == "train":
            self.trained += n
        else:
            self.answered += n
        self.progress.update(self.task, description=f"{self.label} · {self.trained} examples trained · {self.answered} answered")

    def round(self, m: dict) -> None:
        div = "—" if m["divergence"] is None else f"{m['divergence']:.4f}"
        line = (f"{m['method']:>7} round {m['round']:>3}  global {m['global_accuracy']:.3f}  local {m['local_accuracy']:.3f}  "
                f"gap {m['local_global_gap']:+.3f}  ρ {div}  up {m['bytes_up'] / 1e6:.2f} MB  down {m['bytes_down'] / 1e6:.2f} MB  "
                f"{m['wall_seconds']:.1f}s")
        if "global_loss" in m:
            line += f"  loss {m['global_loss']:.3f} (floor {m['bayes_loss']:.3f})"
        if "epsilon" in m:
            eps = "none (no noise)" if m["epsilon"] is None else f"{m['epsilon']:.3g}"
            line += f"  ε {eps} (δ {m['delta']:.0e}{', cohort-simulated' if m.get('epsilon_kind') else ''})"
        if not self.quiet:
            self.progress.console.print(line)


def _work(cfg, prog: _Progress):
    return prog.work if cfg.task == "causal-lm" else None


def _steps(cfg) -> int:
    per_round = max(1, int(round(cfg.fraction * cfg.clients)))
    return per_round * cfg.rounds


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.app.experiment import default_out, run_experiment
    from fedlora.app.report import final_row, markdown_table

    if args.resume:
        from fedlora.app.experiment import resume_config

        given = _given(args)
        if any(k != "rounds" for k in given) or args.config:
            raise ValueError("--resume takes its settings from the run directory; pass only --rounds (to extend the run) with it")
        cfg = resume_config(args.resume, **({"rounds": args.rounds} if args.rounds else {}))
        args.resume_hint = f"fedlora run --resume {cfg.out}"
        with _Progress(_steps(cfg), f"{cfg.method} · {cfg.adapter} (resumed)", args.quiet) as prog:
            exp, history = run_experiment(cfg, on_client=prog.client, on_round=prog.round, on_progress=_work(cfg, prog), resume=True)
        print(markdown_table([final_row(cfg.method, history, sum(h["wall_seconds"] for h in history))]))
        print(f"run directory: {cfg.out}")
        return 0
    cfg = _config_from(args)
    if cfg.out is None:
        cfg.out = args.out or default_out(cfg)
    cfg.validate()
    args.resume_hint = f"fedlora run --resume {cfg.out}"
    t0 = time.perf_counter()
    with _Progress(_steps(cfg), f"{cfg.method} · {cfg.adapter}", args.quiet) as prog:
        exp, history = run_experiment(cfg, on_client=prog.client, on_round=prog.round, on_progress=_work(cfg, prog))
    print(markdown_table([final_row(cfg.method, history, time.perf_counter() - t0)]))
    print(f"run directory: {cfg.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run each method on the same data, partition and seed (:func:`fedlora.app.compare.compare`)."""
    from fedlora.app.compare import compare, method_list
    from fedlora.app.stats import parse_seeds

    methods = method_list(args.methods)
    base = _config_from(args, method=methods[0])
    out = Path(args.out or base.out or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S"))
    args.resume_hint = "fedlora compare " + " ".join(list(args.argv) + ([] if args.out else ["--out", str(out)]))
    seeds = parse_seeds(args.seeds) if args.seeds else None

    def watch(label, cfg):
        return _Progress(_steps(cfg), f"{label} · {cfg.adapter}", args.quiet)

    result = compare(base, methods, seeds=seeds, reference=args.reference, out=out, watch=watch)
    print(result.table)
    print(f"comparison: {out / 'comparison.md'} (plots: accuracy.png, divergence.png, bytes.png)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fedlora.app import study
    from fedlora.app.compare import method_list
    from fedlora.app.stats import parse_seeds

    p = study.preset(args.preset)
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    if not parts:
        raise ValueError(f"--parts {args.parts!r} names no part; pass a comma-separated list of {', '.join(study.PARTS)}, or all")
    if parts == ("all",):
        parts = study.PARTS
    for part in parts:
        if part not in study.PARTS:
            raise ValueError(f"unknown study part {part!r} in --parts; choose from {', '.join(study.PARTS)}")
    methods = tuple(method_list(args.methods or ",".join(study.COMPARISON_METHODS)))
    over = {k: v for k, v in (("model", args.model), ("data", args.data), ("device", args.device)) if v is not None}
    if over:
        p = dataclasses.replace(p, base=p.base.replace(**over).with_absolute_paths())
    if args.seeds:
        p = dataclasses.replace(p, seeds=tuple(parse_seeds(args.seeds)))
    if args.synthetic_seeds and p.synthetic is not None:
        p = dataclasses.replace(p, synthetic=dataclasses.replace(p.synthetic, seeds=tuple(parse_seeds(args.synthetic_seeds, "--synthetic-seeds"))))
    if args.device and p.synthetic is not None:
        p = dataclasses.replace(p, synthetic=dataclasses.replace(p.synthetic, base=p.synthetic.base.replace(device=args.device)))
    if args.device and p.privacy_synthetic is not None:  # its no-DP runs are the synthetic part's: the same device
        p = dataclasses.replace(p, privacy_synthetic=dataclasses.replace(p.privacy_synthetic,
                                                                         base=p.privacy_synthetic.base.replace(device=args.device)))
    runs = study.plan(p, methods=methods, parts=parts)
    for r in runs:  # every bad setting is reported before the first run trains
        r.config.validate()
    runs_dir = Path(args.runs)
    report = Path(args.report) if args.report else runs_dir / "results.md"
    command = "fedlora study " + " ".join(args.argv)
    study.check_runs_dir(runs, runs_dir)
    if args.report_only:
        histories = study.load_histories(runs, runs_dir)
    else:
        todo = [r for r in runs if study.finished_history(runs_dir / r.name, r.config) is None]
        print(f"study: {len(runs)} runs ({len(runs) - len(todo)} already finished) in {runs_dir}", file=sys.stderr)
        state: dict = {}

        def start(i: int, run) -> None:
            if state.get("prog"):
                state["prog"].__exit__(None, None, None)
            state["prog"] = _Progress(_steps(run.config), f"[{i + 1}/{len(runs)}] {run.name}", args.quiet)

        def client(rnd, cid):
            state["prog"].client(rnd, cid)

        def round_(m):
            state["prog"].round(m)

        try:
            histories = study.execute(runs, runs_dir, on_start=start, on_client=client, on_round=round_)
        finally:
            if state.get("prog"):
                state["prog"].__exit__(None, None, None)
    path = study.write_report(p, runs, histories, report, command=command, parts=parts, methods=methods)
    print(f"report: {path} (figures in {path.parent / path.stem})")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(study.replace_readme_table(readme.read_text(), study.readme_table(p, runs, histories, command=command, methods=methods)))
        print(f"comparison table written into {readme}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from fedlora.app.report import methods_table, replace_methods_table

    if not args.write:
        print(methods_table(), end="")
        return 0
    for path in args.write:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"{path!r} does not exist; pass files that hold the methods table markers")
        p.write_text(replace_methods_table(p.read_text()))
        print(f"methods table written into {path}")
    return 0


def cmd_export_private(args: argparse.Namespace) -> int:
    from fedlora.app.private_state import export_private

    for path in export_private(Path(args.run), Path(args.state_dir)):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning with LoRA-family adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment")
    _add_run_flags(run)
    run.add_argument("--out", default=None, help="run directory (default runs/METHOD-TIMESTAMP)")
    run.add_argument("--resume", default=None, metavar="DIR", help="continue a killed run from its last completed round")
    run.set_defaults(func=cmd_run)
    cmp_ = sub.add_parser("compare", help="run several methods on the same data, partition and seed")
    cmp_.add_argument("--methods", default=",".join(_methods()), help="comma-separated methods (default: all)")
    _add_run_flags(cmp_, with_method=False)
    cmp_.add_argument("--out", default=None, help="directory for the table, plots and one run directory per method")
    cmp_.add_argument("--seeds", default=None, help="paired seeds, e.g. 0,1,2 (or a count: 3 means 0,1,2); the table then shows "
                      "95%% intervals and paired differences to --reference (default: --seed alone)")
    cmp_.add_argument("--reference", default=None, help="the method paired differences are taken against, one of --methods "
                      "(default fedit when it is compared)")
    cmp_.set_defaults(func=cmd_compare)
    me = sub.add_parser("methods", help="the registered methods with their rules, bytes, traits and adapters (markdown)")
    me.add_argument("--write", nargs="*", metavar="FILE", help="rewrite the table between the markers in these files")
    me.set_defaults(func=cmd_methods)
    st = sub.add_parser("study", help="the papers' analyses: comparison, divergence, A/B similarity, heterogeneity, scale")
    st.add_argument("--preset", default="default",
                    help="default (MiniLM on BBC News, 3 seeds, about three hours on 2 cores) or quick (tiny model, a smoke test)")
    st.add_argument("--parts", default="comparison,divergence,similarity,heterogeneity,scale,synthetic",
                    help="comma-separated analyses to run (default: all but privacy and privacy-synthetic, the DP-SGD "
                         "privacy–utility curves on MiniLM and on the synthetic task, and "
                         "instruct, instruction tuning of SmolLM2 across tasks), or all; "
                         "each can be run and committed on its own")
    st.add_argument("--methods", default=None, help="methods of the comparison (default: the study's seven)")
    st.add_argument("--model", default=None, help="override the preset's model")
    st.add_argument("--data", default=None, help="override the preset's data")
    st.add_argument("--seeds", default=None, help="paired seeds of the MiniLM parts, e.g. 0,1,2 or a count (default: the preset's, 3)")
    st.add_argument("--synthetic-seeds", default=None, help="paired seeds of the synthetic part (default: the preset's, 20)")
    st.add_argument("--device", default=None, help="auto, cpu or cuda[:N]")
    st.add_argument("--runs", default="runs/study", help="directory of the study's runs; finished runs are reused (default runs/study)")
    st.add_argument("--report", default=None, help="markdown report to write; figures go next to it (default RUNS/results.md)")
    st.add_argument("--report-only", action="store_true", help="only rewrite the report from the finished runs")
    st.add_argument("--readme", default=None, metavar="FILE", help="also write the comparison's accuracy table between the study-table markers of FILE")
    st.add_argument("--quiet", action="store_true", help="no progress display")
    st.set_defaults(func=cmd_study)
    ex = sub.add_parser("export-private", help="a Flower run's private client state (FedSA's B, heads) from a SuperNode's state-dir into RUN/private/")
    ex.add_argument("run", help="the Flower run's directory (config.json, flower.json)")
    ex.add_argument("--state-dir", required=True, help="the SuperNode's state-dir (its node config)")
    ex.set_defaults(func=cmd_export_private)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not the user's concern
    import logging

    # fedlora's warnings as plain lines; set first, so a library that configures the root logger on import (Opacus:
    # timestamped "asctime:LEVEL:" lines) finds it configured and leaves it alone
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    from fedlora.app.rundir import TrainedNothing

    try:
        return args.func(args)
    except TrainedNothing as exc:  # the run finished (its files are kept) but no round aggregated anything
        print(f"fedlora: error: {exc.args[0]}", file=sys.stderr)
        return 3
    except ValueError as exc:
        msg = exc.args[0] if exc.args else str(exc)
        print(f"fedlora: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None)
        then = f"continue with `{hint}`" if hint else "run the same command again to continue"
        print(f"fedlora: interrupted; finished rounds are checkpointed: {then}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
