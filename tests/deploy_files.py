"""Readers for the deployment files in docker/ (test helpers for tests/unit/test_docker.py).

No Docker engine or Kubernetes runs where the tests run, so these take the files apart the
way those tools would: a Dockerfile into stages and instructions, compose-style `${VAR}`
interpolation, shell lines into simple commands, and `spectune ...` / `ray ...` command
lines parsed by the real command-line interfaces (click), without running anything.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import click

# --- Dockerfiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined
    line: int  # where it starts (1-based)

    @property
    def words(self) -> list[str]:
        """Exec form (a JSON array) as given, else the shell form split like a shell would."""
        if self.args.startswith("["):
            return json.loads(self.args)
        return shlex.split(self.args)

    @property
    def flags(self) -> dict[str, str]:
        """Leading `--name=value` flags (COPY --from=..., FROM --platform=...)."""
        return dict(word[2:].partition("=")[::2] for word in self.words[: self._flag_count])

    @property
    def operands(self) -> list[str]:
        """The words after the leading flags."""
        return self.words[self._flag_count:]

    @property
    def _flag_count(self) -> int:
        words = self.words
        return next((n for n, word in enumerate(words) if not word.startswith("--")), len(words))


@dataclass(frozen=True)
class Stage:
    base: str  # FROM's image (ARG defaults substituted), or an earlier stage's name
    name: str | None  # FROM ... AS name
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order. Comments (and parser directives such as `# syntax=`) are
    dropped, also between continuation lines, as Docker does."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, args = " ".join([*pending, line]).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    if pending:
        raise ValueError(f"line {start}: the last instruction ends in a line continuation")
    return instructions


def stages(instructions: Sequence[Instruction]) -> list[Stage]:
    """Build stages; ARGs declared before the first FROM are substituted into FROM lines."""
    global_args: dict[str, str] = {}
    found: list[Stage] = []
    current: list[Instruction] | None = None
    base, name = "", None
    for instruction in instructions:
        if instruction.keyword == "FROM":
            if current is not None:
                found.append(Stage(base, name, tuple(current)))
            words = instruction.operands
            base = interpolate(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            current = []
        elif current is None:
            if instruction.keyword != "ARG":
                raise ValueError(f"line {instruction.line}: only ARG may come before the first FROM")
            key, _, default = instruction.args.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            current.append(instruction)
    if current is None:
        raise ValueError("no FROM instruction")
    found.append(Stage(base, name, tuple(current)))
    return found


def arg_defaults(stage: Stage) -> dict[str, str]:
    defaults = {}
    for instruction in stage.all("ARG"):
        key, _, default = instruction.args.partition("=")
        defaults[key.strip()] = default.strip().strip('"')
    return defaults


def dockerignored(path: str, patterns: Sequence[str]) -> bool:
    """Whether .dockerignore `patterns` leave `path` (relative, '/'-separated) out of the
    build context: the last pattern matching the path or one of its parent folders decides,
    `!` re-includes. (fnmatch's `*` also crosses '/', which only makes this stricter.)"""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        cleaned = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(candidate, cleaned) for candidate in candidates):
            ignored = not negated
    return ignored


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# --- ${VAR} interpolation (compose files, shells) -------------------------------------------


class MissingVariable(KeyError):
    """A required `${VAR:?message}` with no value."""


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's (and the shell's) `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
    `${VAR:?error}`; `$$` is a literal `$`."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        value, op = env.get(name), match["op"]
        if (op == ":-" and not value) or (op == "-" and value is None):
            return match["arg"]
        if op in (":?", "?") and not value:
            raise MissingVariable(f"{name}: {match['arg']}")
        return value or ""

    return _VARIABLE.sub(one, text)


def variables(node: Any) -> set[str]:
    """The names the string values of a parsed YAML document interpolate (`$$` escapes excluded)."""
    if isinstance(node, str):
        return {m["braced"] or m["plain"] for m in _VARIABLE.finditer(node) if not m["escaped"]}
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return set().union(*(variables(value) for value in values))


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of a parsed YAML document (keys stay as they are)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


# --- shell lines ----------------------------------------------------------------------------

_SEPARATORS = {"&&", "||", ";", "|", "&"}
_REDIRECTIONS = {">", ">>", "<", ">&", "<&"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at && || ; | &, without leading `exec`,
    leading VAR=value assignments and redirections."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    tokens = iter(lexer)
    for token in tokens:
        if token in _SEPARATORS:
            commands.append([])
        elif token in _REDIRECTIONS:
            next(tokens, None)  # the redirection's target
        else:
            commands[-1].append(token)
    cleaned = []
    for words in commands:
        while words and (words[0] == "exec" or _ASSIGNMENT.match(words[0])):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def container_commands(command: str | Sequence[str]) -> list[list[str]]:
    """What a container `command:` runs: `bash -c SCRIPT` / `sh -c SCRIPT` are opened up."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if len(words) >= 3 and words[0] in ("bash", "sh", "/bin/bash", "/bin/sh") and words[1] in ("-c", "-ce", "-ec"):
        return simple_commands(words[2])
    return [words]


# --- command lines against the real CLIs ----------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    command: str  # e.g. "spectune sweep", "ray job submit"
    params: dict[str, Any]  # what the command would receive
    nested: tuple[Parsed, ...] = ()  # commands it runs in turn (`ray job submit -- ENTRYPOINT`)


@cache
def _spectune_cli() -> Any:
    import typer

    from spectune.cli import app

    return typer.main.get_command(app)


@cache
def _ray_cli() -> click.Command:
    from ray.scripts.scripts import cli

    return cli


CLIS: dict[str, Callable[[], Any]] = {"spectune": _spectune_cli, "ray": _ray_cli}


def checked_program(words: Sequence[str]) -> bool:
    return bool(words) and words[0].rsplit("/", 1)[-1] in CLIS


def parse_command(words: Sequence[str]) -> Parsed:
    """Parse `spectune ...` or `ray ...` as the installed CLI would, without running it.
    Raises click.UsageError naming an unknown command, an unknown option or a bad value."""
    program = words[0].rsplit("/", 1)[-1]
    command, path, args = CLIS[program](), [program], list(words[1:])
    # Groups by their `commands` table: typer ships its own copy of click, Ray uses click.
    while isinstance(getattr(command, "commands", None), dict) and args and not args[0].startswith("-"):
        name = args.pop(0)
        sub = command.commands.get(name)
        if sub is None:
            raise click.UsageError(f"`{' '.join(path)}` has no command {name!r}; it has: {', '.join(command.commands)}")
        command, path = sub, [*path, name]
    name = " ".join(path)
    if "--help" in args:
        return Parsed(name, {})
    params = command.make_context(name, args).params
    nested = ()
    if name == "ray job submit" and params.get("entrypoint"):
        entry = list(params["entrypoint"])
        if len(entry) == 1:  # one quoted string: the job runs it through a shell
            entry = shlex.split(entry[0])
        nested = tuple(parse_command(w) for w in simple_commands(shlex.join(entry)) if checked_program(w))
    return Parsed(name, params, nested)


def flatten(parsed: Sequence[Parsed]) -> list[Parsed]:
    out: list[Parsed] = []
    for item in parsed:
        out.append(item)
        out.extend(flatten(item.nested))
    return out


# --- Kubernetes quantities ------------------------------------------------------------------


def quantity(value: str | int | float) -> float:
    """A Kubernetes CPU/GPU count: "16", 4, "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
