"""The layers, enforced: every import in src/fedlora (module level or inside functions) goes downward; the
generated docs tables match what the methods declare; the linter is clean."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fedlora"

# What each package may import from fedlora (besides itself). aggregation → adapters → federation → app → front ends;
# generation and data are leaves the federation (causal-LM scoring) and the application use. The two front ends (the
# CLI and the Flower app) sit side by side on the application layer and never import each other.
BELOW_APP = {"aggregation", "adapters", "federation", "generation", "data"}
ALLOWED = {
    "aggregation": set(),
    "generation": set(),
    "data": {"generation"},
    "adapters": {"aggregation"},
    "federation": {"aggregation", "adapters", "generation"},
    "app": BELOW_APP,
    "cli": BELOW_APP | {"app"},
    "flower": BELOW_APP | {"app"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path, *, members: bool = False) -> list[tuple[int, str]]:
    """Every fedlora module ``path`` imports, with the line, resolving relative imports. ``members``: also each name
    imported from a module (``from fedlora.aggregation import fedsb`` gives ``fedlora.aggregation.fedsb`` too)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("fedlora")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("fedlora"):
                out += [(node.lineno, name)] + [(node.lineno, f"{name}.{a.name}") for a in node.names if members or name == "fedlora"]
    return out


def test_every_import_goes_down_the_layers():
    """Module-level and function-level imports alike (``imports`` walks the whole tree of each file)."""
    wrong, counted = [], 0
    for path in sorted(SRC.rglob("*.py")):
        mine = layer_of(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if mine == "__init__":
            continue
        assert mine in ALLOWED, f"{path.relative_to(ROOT)} is in no known layer ({mine}); add it to ALLOWED"
        for line, name in imports(path):
            counted += 1
            theirs = layer_of(name)
            if theirs and theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {name} ({theirs})")
    assert counted > 100, "the import walk found too few imports to be checking anything"
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_import_walk_sees_function_level_imports(tmp_path):
    """An import inside a function body counts like one at the top of the module."""
    f = tmp_path / "fedlora" / "cli" / "x.py"
    f.parent.mkdir(parents=True)
    f.write_text("def f():\n    from fedlora.flower.config import to_flower\n    import fedlora.flower.strategy\n")
    global SRC
    old, SRC = SRC, tmp_path / "fedlora"
    try:
        names = [n for _, n in imports(f)]
    finally:
        SRC = old
    assert names == ["fedlora.flower.config", "fedlora.flower.strategy"]
    assert "flower" not in ALLOWED["cli"] and "cli" not in ALLOWED["flower"]


def test_the_front_ends_import_only_the_application_layer_and_below():
    """The CLI and the Flower app never import each other, at any depth of a function."""
    for front, other in (("cli", "flower"), ("flower", "cli")):
        for path in (SRC / front).rglob("*.py"):
            hits = [(line, n) for line, n in imports(path) if layer_of(n) == other]
            assert not hits, f"{path.relative_to(ROOT)} imports the other front end: {hits}"


def test_the_aggregation_package_has_no_import_cycle():
    """aggregation/__init__ used to import model.py last because model.py imported back from it."""
    graph = {}
    for path in (SRC / "aggregation").glob("*.py"):
        me = "fedlora.aggregation" + ("" if path.name == "__init__.py" else f".{path.stem}")
        graph[me] = {n for _, n in imports(path) if n.startswith("fedlora.aggregation") and n in {
            "fedlora.aggregation" + ("" if p.name == "__init__.py" else f".{p.stem}") for p in (SRC / "aggregation").glob("*.py")}}
    graph.pop("fedlora.aggregation")  # the package re-exports; nothing inside imports it
    for deps in graph.values():
        assert "fedlora.aggregation" not in deps
    seen, done = set(), set()

    def visit(n, trail):
        assert n not in seen or n in done, f"import cycle: {' → '.join(trail + [n])}"
        if n in done:
            return
        seen.add(n)
        for m in graph.get(n, ()):
            visit(m, trail + [n])
        done.add(n)

    for n in graph:
        visit(n, [])


def rule_modules() -> set[str]:
    """The aggregation modules that hold one method's rule: those that call ``register_rule`` (as its decorator)."""
    out = set()
    for path in (SRC / "aggregation").glob("*.py"):
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        if any(getattr(c.func, "id", getattr(c.func, "attr", None)) == "register_rule" for c in calls):
            out.add(f"fedlora.aggregation.{path.stem}")
    return out


def rule_imports(path: Path, rules: set[str]) -> list[tuple[int, str]]:
    """The imports in ``path`` of a rule module or of anything inside one (``fedlora.aggregation.fedsb.x``)."""
    return [(line, n) for line, n in imports(path, members=True) if any(n == r or n.startswith(r + ".") for r in rules)]


def test_the_adapter_layer_imports_no_method_math(tmp_path):
    """The adapters may use the generic aggregation utilities (``Aggregate``, ``block_diagonal``), never a method's
    rule module: a method's math belongs to the method (its rule file, or its protocol file in federation/methods)."""
    global SRC
    rules = rule_modules()
    assert {"fedlora.aggregation.fedit", "fedlora.aggregation.fedsb", "fedlora.aggregation.flora"} <= rules
    assert not rules & {"fedlora.aggregation.registry", "fedlora.aggregation._common", "fedlora.aggregation.result",
                        "fedlora.aggregation.comm", "fedlora.aggregation"}
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in sorted((SRC / "adapters").rglob("*.py"))
             for line, name in rule_imports(path, rules)]
    assert not wrong, "the adapter layer imports a method's rule:\n" + "\n".join(wrong)
    # The check sees every spelling of such an import (and lets the generic ones through).
    f = tmp_path / "fedlora" / "adapters" / "x.py"
    f.parent.mkdir(parents=True)
    f.write_text("from fedlora.aggregation.fedsb import average_cores\nfrom fedlora.aggregation import Aggregate, flora\n"
                 "from ..aggregation import fedit\ndef f():\n    import fedlora.aggregation.ravan\n")
    old, SRC = SRC, tmp_path / "fedlora"
    try:
        hits = [n for _, n in rule_imports(f, rules)]
    finally:
        SRC = old
    assert hits == ["fedlora.aggregation.fedsb", "fedlora.aggregation.fedsb.average_cores", "fedlora.aggregation.flora",
                    "fedlora.aggregation.fedit", "fedlora.aggregation.ravan"]


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_methods_tables_are_generated_from_the_declarations(doc):
    from fedlora.app.report import TABLE_END, TABLE_START, methods_table

    text = (ROOT / doc).read_text()
    table = text.partition(TABLE_START)[2].partition(TABLE_END)[0]
    assert table.strip() == methods_table().strip(), f"{doc}'s methods table is stale: run `fedlora methods --write {doc}`"


def test_cli_choices_and_flower_defaults_come_from_one_place():
    import tomllib

    from fedlora.app.experiment import RunConfig
    from fedlora.cli.main import build_parser
    from fedlora.federation import REGISTRY
    from fedlora.federation.simulator import FederationConfig
    from fedlora.flower.config import to_flower

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = {a.dest: a for a in run._actions}
    for f in ("lr", "local_steps", "rounds", "batch_size", "fraction", "seed", "weighting", "max_norm_ratio"):
        assert getattr(RunConfig(), f) == getattr(FederationConfig(), f), f  # the round loop's defaults are the run's
        assert f in flags and f"default {getattr(RunConfig(), f)}" in flags[f].help
    assert all(name in flags["method"].help for name in REGISTRY)
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app == to_flower(RunConfig())


@pytest.mark.skipif(shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode,
                    reason="ruff is in the test extras (pip install -e '.[all]')")
def test_ruff_is_clean():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
