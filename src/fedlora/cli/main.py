"""The ``fedlora`` command line (front end): ``fedlora run``, ``fedlora compare`` and ``fedlora study``."""

from __future__ import annotations

import argparse
import dataclasses
import math
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
                group.add_argument(flag, *filter(None, [f.metadata.get("alias")]), type=typ, default=None, help=help_)
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
        if "staleness" in m:  # asynchronous: a line per version step
            line += f"  sim {m['sim_seconds']:.1f}s (clock {m['sim_clock']:.1f}s, staleness {m['staleness']})"
        elif "sim_clock" in m:
            line += f"  sim {m['sim_seconds']:.1f}s (clock {m['sim_clock']:.1f}s, {m['n_dropped']} dropped)"
        if "epsilon" in m:
            eps = "none (no noise)" if m["epsilon"] is None else f"{m['epsilon']:.3g}"
            line += f"  ε {eps} (δ {m['delta']:.0e}{', cohort-simulated' if m.get('epsilon_kind') else ''})"
        if not self.quiet:
            self.progress.console.print(line)


def rich_tables(markdown: str) -> list:
    """The markdown tables of a run's or comparison's summary as rich tables (numbers right-aligned, the method
    column bold), the lines between them as text."""
    from rich.table import Table
    from rich.text import Text

    out: list = []
    lines = markdown.strip("\n").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            head = [c.strip() for c in lines[i].strip("|").split("|")]
            table = Table(show_edge=True, header_style="bold")
            for j, name in enumerate(head):
                table.add_column(name, justify="left" if j == 0 else "right", style="bold" if j == 0 else None)
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                table.add_row(*[Text(c.strip()) for c in lines[i].strip("|").split("|")])  # no markup: "[0.31, 0.40]" is an interval
                i += 1
            out.append(table)
        else:
            out.append(Text(lines[i]))
            i += 1
    return out


def print_summary(markdown: str) -> None:
    """The summary table at the end of ``run`` and ``compare``: rich tables in a terminal; the markdown itself when
    stdout is a pipe or a file (what scripts read, as summary.md and comparison.md hold it)."""
    if not sys.stdout.isatty():
        print(markdown)
        return
    from rich.console import Console

    console = Console()
    for item in rich_tables(markdown):
        console.print(item)


def _work(cfg, prog: _Progress):
    return prog.work if cfg.task == "causal-lm" else None


def _steps(cfg) -> int:
    per_round = max(1, int(round(cfg.fraction * cfg.clients)))
    return min(cfg.clients, math.ceil(cfg.over_select * per_round - 1e-9)) * cfg.rounds  # over-selected clients train too


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.app.experiment import default_out, run_experiment
    from fedlora.app.report import final_row, markdown_table

    if args.resume:
        from fedlora.app.experiment import resume_config

        given = _given(args)
        if any(k not in ("rounds", "track", "mlflow_uri") for k in given) or args.config:
            raise ValueError("--resume takes its settings from the run directory; pass only --rounds (to extend the run) "
                             "and --track (trackers to go on or start logging to) with it")
        cfg = resume_config(args.resume, **given)
        args.resume_hint = f"fedlora run --resume {cfg.out}"
        with _Progress(_steps(cfg), f"{cfg.method} · {cfg.adapter} (resumed)", args.quiet) as prog:
            exp, history = run_experiment(cfg, on_client=prog.client, on_round=prog.round, on_progress=_work(cfg, prog), resume=True)
        print_summary(markdown_table([final_row(cfg.method, history, sum(h["wall_seconds"] for h in history))]))
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
    print_summary(markdown_table([final_row(cfg.method, history, time.perf_counter() - t0)]))
    print(f"run directory: {cfg.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run each method on the same data, partition and seed (:func:`fedlora.app.compare.compare`)."""
    from fedlora.app.compare import compare, method_list
    from fedlora.app.report import check_compare_table, write_compare_table
    from fedlora.app.stats import parse_seeds

    methods = method_list(args.methods)
    base = _config_from(args, method=methods[0])
    out = Path(args.out or base.out or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S"))
    args.resume_hint = "fedlora compare " + " ".join(list(args.argv) + ([] if args.out else ["--out", str(out)]))
    seeds = parse_seeds(args.seeds) if args.seeds else None
    for path in args.write_table:  # refused before any run, not after an hour of them
        check_compare_table(Path(path))

    def watch(label, cfg):
        return _Progress(_steps(cfg), f"{label} · {cfg.adapter}", args.quiet)

    result = compare(base, methods, seeds=seeds, reference=args.reference, out=out, watch=watch, target_accuracy=args.target_accuracy)
    print_summary(result.table)
    timed = ", accuracy_time.png" if (out / "accuracy_time.png").exists() else ""
    print(f"comparison: {out / 'comparison.md'} (plots: accuracy.png, divergence.png, bytes.png, tradeoff.png{timed})")
    for path in args.write_table:
        write_compare_table(Path(path), result.table)
        print(f"comparison table written into {path}")
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
    if args.track or args.mlflow_uri:
        runs = [dataclasses.replace(r, config=r.config.replace(track=args.track or "", mlflow_uri=args.mlflow_uri or "")) for r in runs]
    for r in runs:  # every bad setting is reported before the first run trains
        r.config.validate()
    runs_dir = Path(args.runs)
    report = Path(args.report) if args.report else runs_dir / "results.md"
    command = "fedlora study " + " ".join(args.argv)
    study.check_runs_dir(runs, runs_dir)
    if args.report_only:
        histories = study.load_histories(runs, runs_dir)
        path = study.write_report(p, runs, histories, report, command=command, parts=parts, methods=methods)
    else:
        path, histories = _study_runs(args, p, runs, runs_dir, report, command, parts, methods)
    print(f"report: {path} (figures in {path.parent / path.stem})")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(study.replace_readme_table(readme.read_text(), study.readme_table(p, runs, histories, command=command, methods=methods)))
        print(f"comparison table written into {readme}")
    return 0


def _study_runs(args, p, runs, runs_dir: Path, report: Path, command: str, parts, methods) -> tuple[Path, dict]:
    """The study's missing runs (one tracker group with ``--track``), then its report: (the report's path, histories)."""
    from fedlora.app import study
    from fedlora.app.tracking import Group

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

    params = {"preset": args.preset, "parts": ",".join(parts), "methods": ",".join(methods), "runs": str(runs_dir)}
    with Group(args.track or "", runs_dir, mlflow_uri=args.mlflow_uri or "", kind="study", params=params) as group:
        try:
            histories = study.execute(runs, runs_dir, on_start=start, on_client=client, on_round=round_, group=group)
        finally:
            if state.get("prog"):
                state["prog"].__exit__(None, None, None)
        path = study.write_report(p, runs, histories, report, command=command, parts=parts, methods=methods)
        group.finish([path, *sorted((path.parent / path.stem).glob("*.png"))])
    return path, histories


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


def cmd_export(args: argparse.Namespace) -> int:
    from fedlora.app.export import export_merged

    done = export_merged(Path(args.run), Path(args.merged), client=args.client)
    print(f"wrote the {done['model']} model, merged, to {done['out']} (largest logit difference from the run's model: "
          f"{done['max_logit_difference']:.2g}); load it with transformers' AutoModel…from_pretrained")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedlora.app.evaluate import EVAL_FILE, evaluate_run

    entry = evaluate_run(Path(args.run), client=args.client, data=args.data, evals=args.eval)
    print(f"{entry['model']} model, round {entry['round']}, on {entry['data']}" + (f" and {entry['eval']}" if entry["eval"] else ""))
    for key, value in entry["results"].items():
        if isinstance(value, float) and key.count("/") <= 1:  # headlines; per subject and per task in eval.json
            print(f"  {key}: {value:.4f}")
    print(f"appended to {Path(args.run) / EVAL_FILE} (with every per-subject and per-task score)")
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
    cmp_.add_argument("--target-accuracy", type=float, default=None, metavar="X",
                      help="report time-to-target (simulated seconds, with --devices) and bytes-to-target of global accuracy X "
                           "(default: 0.9 x central's final accuracy when central is compared); docs/systems.md")
    cmp_.add_argument("--write-table", nargs="+", default=[], metavar="FILE",
                      help="also write the table between the compare-table markers of these markdown files (docs)")
    cmp_.set_defaults(func=cmd_compare)
    me = sub.add_parser("methods", help="the registered methods with their rules, bytes, traits and adapters (markdown)")
    me.add_argument("--write", nargs="*", metavar="FILE", help="rewrite the table between the markers in these files")
    me.set_defaults(func=cmd_methods)
    st = sub.add_parser("study", help="the papers' analyses over paired seeds (--parts: comparison, divergence, similarity, "
                        "heterogeneity, scale, synthetic; privacy, privacy-synthetic, instruct, privacy-instruct and systems by name)")
    st.add_argument("--preset", default="default",
                    help="default (MiniLM on BBC News, 3 seeds, about three hours on 2 cores), quick (tiny model, a smoke test) "
                         "or dp-large-batch (the privacy part at DP-SGD batch 275, about 4 hours: docs/privacy.md)")
    st.add_argument("--parts", default="comparison,divergence,similarity,heterogeneity,scale,synthetic",
                    help="comma-separated analyses to run (default: all but privacy and privacy-synthetic, the DP-SGD "
                         "privacy–utility curves on MiniLM and on the synthetic task, and "
                         "instruct and privacy-instruct, instruction tuning of SmolLM2 across tasks without and with DP, "
                         "and systems, synchronous vs deadline vs FedBuff under a simulated clock), or all; "
                         "each can be run and committed on its own")
    st.add_argument("--methods", default=None, help="methods of the comparison (default: the study's seven)")
    st.add_argument("--model", default=None, help="override the preset's model")
    st.add_argument("--data", default=None, help="override the preset's data")
    st.add_argument("--seeds", default=None, help="paired seeds of the MiniLM parts, e.g. 0,1,2 or a count (default: the preset's, 3)")
    st.add_argument("--synthetic-seeds", default=None, help="paired seeds of the synthetic part (default: the preset's, 20; "
                    "the systems part's synthetic setting has its own, 10)")
    st.add_argument("--device", default=None, help="auto, cpu or cuda[:N]")
    st.add_argument("--runs", default="runs/study", help="directory of the study's runs; finished runs are reused (default runs/study)")
    st.add_argument("--report", default=None, help="markdown report to write; figures go next to it (default RUNS/results.md)")
    st.add_argument("--report-only", action="store_true", help="only rewrite the report from the finished runs")
    st.add_argument("--readme", default=None, metavar="FILE", help="also write the comparison's accuracy table between the study-table markers of FILE")
    st.add_argument("--track", default=None, help="experiment trackers for every run, comma-separated: tensorboard, mlflow, wandb "
                    "(one MLflow parent run and W&B group for the study; pip install 'fedlora[track]')")
    st.add_argument("--mlflow-uri", default=None, help="MLflow tracking store (default: mlflow.db in --runs)")
    st.add_argument("--quiet", action="store_true", help="no progress display")
    st.set_defaults(func=cmd_study)
    ex = sub.add_parser("export-private", help="a Flower run's private client state (FedSA's B, heads) from a SuperNode's state-dir into RUN/private/")
    ex.add_argument("run", help="the Flower run's directory (config.json, flower.json)")
    ex.add_argument("--state-dir", required=True, help="the SuperNode's state-dir (its node config)")
    ex.set_defaults(func=cmd_export_private)
    mg = sub.add_parser("export", help="a finished run's global (or one client's) model as a standalone Hugging Face model, adapters merged")
    mg.add_argument("run", help="the run's directory (its --out)")
    mg.add_argument("--merged", required=True, metavar="OUT", help="the new model directory to write (weights, config, tokenizer)")
    mg.add_argument("--client", type=int, default=None, metavar="N", help="client N's own model (personalised methods: FedSA's private B, "
                    "heads kept local) instead of the global one")
    mg.set_defaults(func=cmd_export)
    ev = sub.add_parser("eval", help="score a finished run's model again (its test sets, other data, benchmarks) into RUN/eval.json")
    ev.add_argument("run", help="the run's directory (its --out)")
    ev.add_argument("--client", type=int, default=None, metavar="N", help="client N's own model, on its own test shard and the global test set")
    ev.add_argument("--data", default=None, help="score on every example of this data instead (same forms as run --data; labels must be the run's)")
    ev.add_argument("--eval", default=None, help="causal-LM runs: benchmarks as well, e.g. mmlu:200,truthfulqa (see run --eval)")
    ev.set_defaults(func=cmd_eval)
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
