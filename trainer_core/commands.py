"""The command grammar shared by stdin, the WebSocket and REST: text or JSON -> typed Command.

One parser for every entry point means a command that works in the terminal works the same
from the browser, with the same error messages. The module is pure (standard library only)
so the loop, the server and the tests can all use it without pulling in torch.

Grammar::

    save | export [NAME] | eval | quit | eval_quit | pause | resume
    lr VALUE | loss_scale VALUE | time [to STEP] | status | help
    event show | event clear | event cancel ID
    COMMAND@STEP                 run COMMAND when the run reaches STEP

Command words are case-insensitive and surrounding whitespace is ignored (``  LR 1e-4 `` is
``lr 0.0001``); spaces around ``@`` are allowed (``save @ 100``). Export names keep their case.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

COMMAND_NAMES: tuple[str, ...] = (
    "save",
    "export",
    "eval",
    "quit",
    "eval_quit",
    "pause",
    "resume",
    "lr",
    "loss_scale",
    "time",
    "status",
    "help",
    "event",
)

# Commands answered at once: scheduling them would only delay an answer nobody waits for.
# `resume` joins them because a paused run never reaches a new step, so it could never fire.
UNSCHEDULABLE: frozenset[str] = frozenset({"help", "status", "event", "resume"})
VALUE_COMMANDS: frozenset[str] = frozenset({"lr", "loss_scale"})
NO_ARG_COMMANDS: frozenset[str] = frozenset({"save", "eval", "quit", "eval_quit", "pause", "resume", "status", "help"})
EVENT_ACTIONS: tuple[str, ...] = ("show", "clear", "cancel")

MAX_LINE_LENGTH = 1000
EXPORT_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
STEP_RE = re.compile(r"[0-9]+")

HELP_TEXT = """\
Commands (case-insensitive; add @STEP to run one when the run reaches STEP, e.g. save@5000):
  save                 save a checkpoint now
  export [NAME]        export the weights to exports/NAME.safetensors (default name: the step)
  eval                 run the evaluation now
  quit                 stop training (saves first if trainer.save_on_quit)
  eval_quit            run the evaluation, then quit
  pause                pause training at the next step boundary
  resume               resume a paused run (cannot be scheduled)
  lr VALUE             set the learning rate, e.g. lr 1e-4
  loss_scale VALUE     set the loss scale, e.g. loss_scale 1024
  time [to STEP]       elapsed time and the estimated time to the end (or to STEP)
  status               step, lr, speed and scheduled commands (cannot be scheduled)
  help                 this list (cannot be scheduled)
  event show           list the scheduled commands with their ids
  event clear          drop every scheduled command
  event cancel ID      drop one scheduled command"""


class CommandError(ValueError):
    """A command that cannot be understood or carried out; the message says why."""


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class Command:
    """One parsed command; construction validates, so every instance is a valid command.

    ``value``: the number for lr / loss_scale. ``arg``: the export name, or the event action
    (show|clear|cancel). ``target``: the step of ``time to STEP`` or the id of ``event cancel``.
    ``at_step``: the step a scheduled command (``COMMAND@STEP``) runs at.
    """

    name: str
    value: float | None = None
    arg: str | None = None
    target: int | None = None
    at_step: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in COMMAND_NAMES:
            raise CommandError(f"unknown command {self.name!r}{_suggest(str(self.name), COMMAND_NAMES)}")
        if self.value is not None:
            object.__setattr__(self, "value", _check_value(self.name, self.value))
        _check_fields(self)
        if self.at_step is not None:
            _check_step(self.at_step, "at_step")
            if self.name in UNSCHEDULABLE:
                raise CommandError(_unschedulable_message(self.name))

    @property
    def is_scheduling(self) -> bool:
        """True for ``COMMAND@STEP``: it goes to the Scheduler rather than running now."""
        return self.at_step is not None

    @property
    def schedulable(self) -> bool:
        return self.name not in UNSCHEDULABLE

    @property
    def is_query(self) -> bool:
        """Commands that only report (they change nothing in the run)."""
        return self.name in ("help", "status", "time") or (self.name == "event" and self.arg == "show")

    def unscheduled(self) -> Command:
        """The command to run when its step comes (the same command without ``@STEP``)."""
        return replace(self, at_step=None)

    def at(self, step: int) -> Command:
        return replace(self, at_step=step)

    def to_line(self) -> str:
        """The canonical text form; ``parse(c.to_line()) == c`` for every command."""
        words = [self.name]
        if self.value is not None:
            words.append(repr(self.value))
        if self.name == "time" and self.target is not None:
            words += ["to", str(self.target)]
        elif self.arg is not None:
            words.append(self.arg)
            if self.target is not None:
                words.append(str(self.target))
        line = " ".join(words)
        return line if self.at_step is None else f"{line}@{self.at_step}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "arg": self.arg, "target": self.target,
                "at_step": self.at_step, "line": self.to_line()}


def _unschedulable_message(name: str) -> str:
    if name == "resume":
        return "resume cannot be scheduled with '@': a paused run never reaches a new step"
    return f"{name} cannot be scheduled with '@': it is answered at once"


def _check_value(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(f"{name}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise CommandError(f"{name} must be a finite positive number, got {value!r}")
    return number


def _check_step(step: object, what: str) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CommandError(f"{what} must be a non-negative integer, got {step!r}")
    return step


def _check_fields(cmd: Command) -> None:
    """Each command takes exactly its own fields; anything else is a caller's mistake."""
    name = cmd.name
    if (cmd.value is None) == (name in VALUE_COMMANDS):
        raise CommandError(f"{name} needs a value, e.g. '{name} 1e-4'" if cmd.value is None
                           else f"{name} takes no value")
    if name == "export":
        if cmd.arg is not None:
            check_export_name(cmd.arg)
    elif name == "event":
        if cmd.arg not in EVENT_ACTIONS:
            raise CommandError(_event_usage(cmd.arg))
        if (cmd.target is None) == (cmd.arg == "cancel"):
            raise CommandError("event cancel needs an id, e.g. 'event cancel 3'" if cmd.target is None
                               else f"event {cmd.arg} takes no id")
    elif cmd.arg is not None:
        raise CommandError(f"{name} takes no argument, got {cmd.arg!r}")
    if cmd.target is not None:
        if name not in ("time", "event"):
            raise CommandError(f"{name} takes no target step")
        _check_step(cmd.target, "event cancel id" if name == "event" else "time to STEP")


def _event_usage(action: object) -> str:
    usage = "'event show', 'event clear' or 'event cancel ID'"
    if action is None:
        return f"event needs an action: {usage}"
    return f"unknown event action {action!r}{_suggest(str(action), EVENT_ACTIONS)} (use {usage})"


def check_export_name(name: object) -> str:
    """Export names become file names: keep them inside the export folder and portable."""
    if not isinstance(name, str) or not EXPORT_NAME_RE.fullmatch(name):
        raise CommandError(
            f"export: name {name!r} is not allowed; use 1-100 letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )
    return name


def _parse_number(name: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise CommandError(f"{name}: {text!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise CommandError(f"{name} must be a finite positive number, got {text!r}")
    return number


def _parse_step(text: str, what: str) -> int:
    if not STEP_RE.fullmatch(text):
        raise CommandError(f"{what}: {text!r} is not a non-negative integer")
    return int(text)


def _parse_body(words: list[str]) -> Command:
    """Parse the part before any ``@STEP``: a command word and its arguments."""
    name, args = words[0].lower(), words[1:]
    if name not in COMMAND_NAMES:
        raise CommandError(_unknown_command(words[0]))
    if name in NO_ARG_COMMANDS:
        if args:
            raise CommandError(f"{name} takes no arguments, got {' '.join(args)!r}")
        return Command(name)
    if name in VALUE_COMMANDS:
        if len(args) != 1:
            example = f"e.g. '{name} {'1e-4' if name == 'lr' else '1024'}'"
            problem = "needs a value" if not args else f"takes one value, got {' '.join(args)!r}"
            raise CommandError(f"{name} {problem}, {example}")
        return Command(name, value=_parse_number(name, args[0]))
    if name == "export":
        if len(args) > 1:
            raise CommandError(f"export takes at most one name, got {' '.join(args)!r}")
        return Command(name, arg=check_export_name(args[0]) if args else None)
    if name == "time":
        if not args:
            return Command(name)
        if len(args) != 2 or args[0].lower() != "to":
            raise CommandError(f"time takes nothing or 'to STEP', e.g. 'time to 5000'; got {' '.join(args)!r}")
        return Command(name, target=_parse_step(args[1], "time to"))
    return _parse_event(args)


def _parse_event(args: list[str]) -> Command:
    if not args:
        raise CommandError(_event_usage(None))
    action = args[0].lower()
    if action not in EVENT_ACTIONS:
        raise CommandError(_event_usage(args[0]))
    if action != "cancel":
        if len(args) > 1:
            raise CommandError(f"event {action} takes no arguments, got {' '.join(args[1:])!r}")
        return Command("event", arg=action)
    if len(args) != 2:
        raise CommandError("event cancel needs one id, e.g. 'event cancel 3'")
    return Command("event", arg="cancel", target=_parse_step(args[1], "event cancel id"))


def _unknown_command(word: str) -> str:
    """Name the unknown word and point at the likely intended command."""
    lowered = word.lower()
    for sep in ("=", ":"):
        head, _, tail = lowered.partition(sep)
        if tail and head in VALUE_COMMANDS:
            return f"unknown command {word!r}; did you mean '{head} {tail}'?"
    hint = _suggest(lowered, COMMAND_NAMES) or "; type 'help' for the list of commands"
    return f"unknown command {word!r}{hint}"


def parse(line: str) -> Command:
    """Parse one command line; raises CommandError with a message for the user."""
    if not isinstance(line, str):
        raise CommandError(f"a command must be text, got {type(line).__name__}")
    text = line.strip()
    if not text:
        raise CommandError("empty command; type 'help' for the list of commands")
    if len(text) > MAX_LINE_LENGTH:
        raise CommandError(f"command too long ({len(text)} characters, at most {MAX_LINE_LENGTH})")
    body, sep, step_text = text.partition("@")
    at_step = None
    if sep:
        if "@" in step_text:
            raise CommandError(f"{text!r}: only one '@STEP' is allowed")
        if not body.strip():
            raise CommandError(f"{text!r}: '@STEP' needs a command before it, e.g. 'save@100'")
        if not step_text.strip():
            raise CommandError(f"{text!r}: '@' needs a step after it, e.g. 'save@100'")
        at_step = _parse_step(step_text.strip(), "@STEP")
    command = _parse_body(body.split())
    if at_step is None:
        return command
    if not command.schedulable:
        raise CommandError(_unschedulable_message(command.name))
    return command.at(at_step)


# JSON bodies: which optional field each command accepts, and which Command field it fills.
_REQUEST_FIELDS: dict[str, str] = {"value": "value", "name": "arg", "to": "target", "action": "arg", "id": "target"}
_FIELDS_OF: dict[str, tuple[str, ...]] = {
    "lr": ("value",), "loss_scale": ("value",), "export": ("name",), "time": ("to",), "event": ("action", "id"),
}
_ALL_BODY_KEYS: tuple[str, ...] = ("value", "name", "to", "action", "id", "at_step")


def from_request(obj: object) -> Command:
    """A command from a JSON body: ``{"line": "lr 1e-4"}`` or ``{"command": "lr", "value": 1e-4, ...}``.

    A ``"type": "command"`` key (the WebSocket envelope) is accepted and ignored.
    """
    if not isinstance(obj, Mapping):
        raise CommandError(f"a command request must be a JSON object, got {_json_type(obj)}")
    body = dict(obj)
    kind = body.pop("type", "command")
    if kind != "command":
        raise CommandError(f"a command request has type 'command', got {kind!r}")
    if "line" in body:
        if len(body) > 1:
            extra = ", ".join(sorted(repr(k) for k in body if k != "line"))
            raise CommandError(f"give either 'line' or 'command' with its fields, not both (extra: {extra})")
        return parse(body["line"])
    if "command" not in body:
        hint = _suggest(next(iter(body), ""), ["command", "line"]) if body else ""
        raise CommandError(f"a command request needs 'line' or 'command'{hint}")
    name = body.pop("command")
    return from_name(name, body)


def from_name(name: object, body: Mapping[str, Any] | None = None) -> Command:
    """A command from REST ``POST /command/{name}`` and its optional JSON body."""
    if not isinstance(name, str):
        raise CommandError(f"a command name must be text, got {_json_type(name)}")
    key = name.strip().lower()
    if key not in COMMAND_NAMES:
        raise CommandError(_unknown_command(name.strip()))
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise CommandError(f"the body of '{key}' must be a JSON object, got {_json_type(body)}")
    fields: dict[str, Any] = {}
    for field_name, raw in body.items():
        if field_name not in _ALL_BODY_KEYS:
            hint = _suggest(str(field_name), _ALL_BODY_KEYS) or f" (accepted: {', '.join(_ALL_BODY_KEYS)})"
            raise CommandError(f"unknown field {field_name!r}{hint}")
        if field_name != "at_step" and field_name not in _FIELDS_OF.get(key, ()):
            raise CommandError(f"{key} does not take {field_name!r}")
        if raw is not None:
            fields[field_name] = _request_field(key, field_name, raw)
    return _build_from_fields(key, fields)


def _request_field(name: str, field_name: str, raw: object) -> Any:
    """Convert one JSON field; strings are read with the text grammar's own rules."""
    if isinstance(raw, bool):
        raise CommandError(f"{name}: '{field_name}' must not be a boolean, got {str(raw).lower()}")
    if field_name == "value":
        if isinstance(raw, str):
            return _parse_number(name, raw.strip())
        return _check_value(name, raw)
    if field_name in ("name", "action"):
        if not isinstance(raw, str):
            raise CommandError(f"{name}: '{field_name}' must be text, got {_json_type(raw)}")
        return raw.lower() if field_name == "action" else raw
    what = {"to": "time to", "id": "event cancel id", "at_step": "at_step"}[field_name]
    if isinstance(raw, str):
        return _parse_step(raw.strip(), what)
    if not isinstance(raw, int):
        raise CommandError(f"{what} must be a non-negative integer, got {raw!r}")
    return _check_step(raw, what)


def _build_from_fields(name: str, fields: dict[str, Any]) -> Command:
    at_step = fields.pop("at_step", None)
    if at_step is not None and name in UNSCHEDULABLE:
        raise CommandError(_unschedulable_message(name))
    if name in VALUE_COMMANDS and "value" not in fields:
        raise CommandError(f"{name} needs a value, e.g. {{\"value\": {1e-4 if name == 'lr' else 1024}}}")
    if name == "event" and "action" not in fields:
        raise CommandError("event needs an action: {\"action\": \"show\"|\"clear\"|\"cancel\", \"id\": N}")
    kwargs = {_REQUEST_FIELDS[k]: v for k, v in fields.items()}
    return Command(name, at_step=at_step, **kwargs)


def _json_type(obj: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, label in names.items():
        if isinstance(obj, kind):
            return label
    return "a number" if isinstance(obj, int | float) else type(obj).__name__


def __getattr__(name: str) -> Any:
    """``Scheduler`` and its companions live in ``command_schedule``; importable from here too."""
    if name in ("Scheduler", "ScheduledCommand", "SchedulerStateError"):
        from trainer_core import command_schedule

        return getattr(command_schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
