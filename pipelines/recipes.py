"""Recipes: a small TOML file naming the steps of one benchmark run, and `leccr-pipe run`.

    name = "multi30k-de"
    workdir = "runs/${name}"            # ${var}: from [vars], or --var KEY=VALUE
    [vars]
    data = "data/multi30k"
    [[steps]]
    command = "import-benchmark"        # any leccr-pipe command
    format = "multi30k"                 # its options: key = value (--key value); true/false for
    input = "${data}"                   # flags (--key / --no-key); a list repeats the option

Each step runs the `leccr-pipe` command in this process with `--workdir` set to the recipe's,
its summary saved as WORKDIR/reports/<step>.json (commands that write one). Steps run in order
and the first failure stops the recipe with the step's exit code.

Every step is resumable, so a rerun continues: WORKDIR/recipes/<name>.json records each
finished step with a hash of its options; a rerun skips those, and an unfinished step is run
again, which continues where it stopped (describe and translate skip the rows already
written; train gets `--resume` when the run has a last.pt; the others are cheap and
deterministic). A step whose options changed runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines import store
from pipelines.storage import is_uri

RECIPES_DIR = "recipes"
# Commands with a --report-json option: their summary goes to WORKDIR/reports/<step>.json.
REPORTING = {"ingest": False, "describe": True, "translate": True, "train": True, "evaluate": True,
             "import-benchmark": True, "index": True}
NO_WORKDIR = {"make-sample-data", "make-tiny-model"}     # commands that take no --workdir


class RecipeError(store.StageInputError):
    """A recipe that cannot run as written (exit 2)."""


@dataclass
class Step:
    name: str                                  # unique within the recipe: the command, numbered if repeated
    command: str
    options: dict[str, Any]
    action: Callable[[], None] | None = None   # instead of a command (the demo's own steps)


@dataclass
class Recipe:
    name: str
    workdir: Path
    steps: list[Step]


@dataclass
class StepOutcome:
    name: str
    status: str                                # done | skipped (already done) | failed
    seconds: float = 0.0
    exit_code: int = 0
    note: str = ""


@dataclass
class RecipeReport:
    recipe: str
    workdir: str
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return next((s.exit_code for s in self.steps if s.status == "failed"), 0)


# --------------------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_-]*)\}")


def _substitute(value: Any, variables: dict[str, str], where: str) -> Any:
    if isinstance(value, str):
        def one(match: re.Match) -> str:
            if match.group(1) not in variables:
                raise RecipeError(f"{where}: ${{{match.group(1)}}} is not defined (add it to [vars] or pass "
                                  f"--var {match.group(1)}=VALUE)")
            return str(variables[match.group(1)])
        return _VAR.sub(one, value)
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    return value


def load_recipe(path: Path, variables: dict[str, str] | None = None, workdir: Path | None = None) -> Recipe:
    """Parse and check a recipe file (unknown commands and malformed steps are exit 2)."""
    from pipelines.cli import app
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"recipe {path} is not valid TOML: {err}") from None
    name = data.get("name") or path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise RecipeError(f"recipe {path}: name must be letters, digits, '.', '_' or '-', got {name!r}")
    defined = {"name": name, **{k: str(v) for k, v in (data.get("vars") or {}).items()}, **(variables or {})}
    raw = str(workdir) if workdir else (_substitute(data["workdir"], defined, f"{path}: workdir")
                                        if "workdir" in data else None)
    if raw is None:
        raise RecipeError(f"recipe {path} names no workdir: add workdir = \"...\" or pass --workdir")
    if is_uri(raw):
        raise RecipeError(f"recipe {path}: workdir {raw} must be a local folder (its train, evaluate, index and "
                          f"report steps need one); a describe step can still read --input from a bucket")
    target = Path(raw)
    defined["workdir"] = str(target)
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RecipeError(f"recipe {path} has no [[steps]]")
    known = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    steps, seen = [], set()
    for n, raw in enumerate(raw_steps, 1):
        where = f"{path}: step {n}"
        if not isinstance(raw, dict) or not isinstance(raw.get("command"), str):
            raise RecipeError(f"{where}: needs command = \"<leccr-pipe command>\"")
        command = raw["command"]
        if command not in known or command in ("run", "demo"):
            raise RecipeError(f"{where}: unknown command {command!r}; one of "
                              f"{', '.join(sorted(known - {'run', 'demo'}))}")
        options = {k: _substitute(v, defined, where) for k, v in raw.items() if k != "command"}
        if "workdir" in options or "report_json" in options or "report-json" in options:
            raise RecipeError(f"{where}: workdir and report_json are set by the recipe runner")
        step_name = command if command not in seen else f"{command}-{n}"
        seen.add(command)
        steps.append(Step(step_name, command, options))
    return Recipe(name=name, workdir=target, steps=steps)


# --------------------------------------------------------------------------- running

def step_argv(step: Step, workdir: Path) -> list[str]:
    """The command line of a step: options as --key value, flags as --key / --no-key."""
    argv = [step.command]
    if step.command not in NO_WORKDIR:
        argv += ["--workdir", str(workdir)]
    for key, value in step.options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        elif value is not None:
            argv += [flag, str(value)]
    if REPORTING.get(step.command):
        argv += ["--report-json", str(workdir / "reports" / f"{step.name}.json")]
    return argv


def _hash(step: Step) -> str:
    return hashlib.sha256(json.dumps([step.command, step.options], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _state_path(recipe: Recipe) -> Path:
    return recipe.workdir / RECIPES_DIR / f"{recipe.name}.json"


def _load_state(recipe: Recipe) -> dict[str, str]:
    path = _state_path(recipe)
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("done", {}) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _save_state(recipe: Recipe, done: dict[str, str]) -> None:
    path = _state_path(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"recipe": recipe.name, "done": done}, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _resume_train(step: Step, workdir: Path) -> str:
    """An unfinished train step continues its run (--resume) when it has a last.pt."""
    if step.command != "train" or step.options.get("overwrite") or step.options.get("resume"):
        return ""
    run = step.options.get("run_name") or step.options.get("lang")
    if run and (workdir / "checkpoints" / str(run) / "last.pt").is_file():
        step.options = {**step.options, "resume": True}
        return "resumed from last.pt"
    return ""


def invoke(argv: list[str]) -> int:
    """Run one leccr-pipe command line in this process, exactly as the shell would (usage errors
    exit 2, a stage's failure its own code); its exit code."""
    from pipelines.cli import app
    try:
        app(args=argv, prog_name="leccr-pipe")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def run_recipe(recipe: Recipe, until: str | None = None, echo: Callable[[str], None] = print) -> RecipeReport:
    """Run the steps in order (up to and including `until`), skipping finished ones."""
    names = [s.name for s in recipe.steps]
    if until is not None and until not in names:
        raise RecipeError(f"--until {until!r} is not a step of {recipe.name}: {', '.join(names)}")
    report = RecipeReport(recipe=recipe.name, workdir=str(recipe.workdir))
    done = _load_state(recipe)
    recipe.workdir.mkdir(parents=True, exist_ok=True)
    for n, step in enumerate(recipe.steps, 1):
        key = _hash(step)
        if done.get(step.name) == key:
            report.steps.append(StepOutcome(step.name, "skipped", note="done in an earlier run"))
            echo(f"[{n}/{len(recipe.steps)}] {step.name}: done in an earlier run, skipped")
        else:
            note = _resume_train(step, recipe.workdir)
            echo(f"[{n}/{len(recipe.steps)}] {step.name}" + (f" ({note})" if note else ""))
            started = time.time()
            if step.action is not None:
                step.action()
                code = 0
            else:
                code = invoke(step_argv(step, recipe.workdir))
            outcome = StepOutcome(step.name, "done" if code == 0 else "failed", time.time() - started, code, note)
            report.steps.append(outcome)
            if code != 0:
                echo(f"[{n}/{len(recipe.steps)}] {step.name} failed (exit {code}); fix it and rerun: finished "
                     "steps are skipped")
                break
            done[step.name] = key
            _save_state(recipe, done)
        if step.name == until:
            break
    return report


def print_report(report: RecipeReport) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"recipe {report.recipe}: summary ({report.workdir})")
    for col in ("step", "status", "seconds", "note"):
        table.add_column(col)
    for s in report.steps:
        table.add_row(s.name, s.status if s.status != "failed" else f"failed (exit {s.exit_code})",
                      f"{s.seconds:.1f}", s.note)
    Console(stderr=True).print(table)
