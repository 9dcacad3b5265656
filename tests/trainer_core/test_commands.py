"""The command grammar: every command, every error, JSON bodies and the step scheduler."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_core.commands import (
    COMMAND_NAMES,
    EVENT_ACTIONS,
    EXPORT_NAME_RE,
    HELP_TEXT,
    UNSCHEDULABLE,
    Command,
    CommandError,
    from_name,
    from_request,
    parse,
)

SETTINGS = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------------------ parse: valid lines

@pytest.mark.parametrize(
    ("line", "expected", "canonical"),
    [
        ("save", Command("save"), "save"),
        ("export", Command("export"), "export"),
        ("export best", Command("export", arg="best"), "export best"),
        ("eval", Command("eval"), "eval"),
        ("quit", Command("quit"), "quit"),
        ("eval_quit", Command("eval_quit"), "eval_quit"),
        ("pause", Command("pause"), "pause"),
        ("resume", Command("resume"), "resume"),
        ("lr 1e-4", Command("lr", value=1e-4), "lr 0.0001"),
        ("loss_scale 1024", Command("loss_scale", value=1024.0), "loss_scale 1024.0"),
        ("time", Command("time"), "time"),
        ("time to 5000", Command("time", target=5000), "time to 5000"),
        ("status", Command("status"), "status"),
        ("help", Command("help"), "help"),
        ("event show", Command("event", arg="show"), "event show"),
        ("event clear", Command("event", arg="clear"), "event clear"),
        ("event cancel 3", Command("event", arg="cancel", target=3), "event cancel 3"),
        ("save@100", Command("save", at_step=100), "save@100"),
        ("lr 3e-4@500", Command("lr", value=3e-4, at_step=500), "lr 0.0003@500"),
        ("export final@0", Command("export", arg="final", at_step=0), "export final@0"),
        ("time to 9@8", Command("time", target=9, at_step=8), "time to 9@8"),
    ],
)
def test_every_command_parses_to_its_command_and_canonical_line(line: str, expected: Command, canonical: str) -> None:
    command = parse(line)
    assert command == expected
    assert command.to_line() == canonical
    assert parse(canonical) == command


def test_every_command_name_is_covered_by_the_grammar_and_the_help() -> None:
    assert set(COMMAND_NAMES) == {
        "save", "export", "eval", "quit", "eval_quit", "pause", "resume",
        "lr", "loss_scale", "time", "status", "help", "event",
    }
    for name in COMMAND_NAMES:
        assert re.search(rf"^\s+{name}\b", HELP_TEXT, re.MULTILINE), name


@pytest.mark.parametrize("line", ["  LR 1e-4 ", "lr   0.0001", "Lr\t1E-4", "\nlr 1e-4\n"])
def test_whitespace_and_case_of_command_words_are_lenient(line: str) -> None:
    assert parse(line) == Command("lr", value=1e-4)


@pytest.mark.parametrize("line", ["save@100", "save @ 100", "SAVE@ 100", " save @100 "])
def test_spaces_around_the_at_sign_are_allowed(line: str) -> None:
    assert parse(line) == Command("save", at_step=100)


def test_export_name_keeps_its_case_while_the_command_word_does_not() -> None:
    assert parse("EXPORT My.Model-v2_1").arg == "My.Model-v2_1"


def test_event_actions_and_the_time_keyword_are_case_insensitive() -> None:
    assert parse("EVENT Cancel 4") == Command("event", arg="cancel", target=4)
    assert parse("Time TO 7") == Command("time", target=7)


def test_properties_tell_scheduling_and_query_commands_apart() -> None:
    scheduled = parse("save@10")
    assert scheduled.is_scheduling and scheduled.schedulable
    assert scheduled.unscheduled() == Command("save") and not Command("save").is_scheduling
    assert parse("status").is_query and parse("event show").is_query and not parse("save").is_query
    assert not parse("help").schedulable and not parse("resume").schedulable
    assert parse("save").to_dict() == {"name": "save", "value": None, "arg": None, "target": None,
                                       "at_step": None, "line": "save"}


# ------------------------------------------------------------------------------ parse: errors

@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sav", "unknown command 'sav'; did you mean 'save'?"),
        ("evalquit", "unknown command 'evalquit'; did you mean 'eval_quit'?"),
        ("los_scale 2", "unknown command 'los_scale'; did you mean 'loss_scale'?"),
        ("stauts", "unknown command 'stauts'; did you mean 'status'?"),
        ("Expotr", "unknown command 'Expotr'; did you mean 'export'?"),
        ("lr=1e-4", "unknown command 'lr=1e-4'; did you mean 'lr 1e-4'?"),
        ("xyzzy", "unknown command 'xyzzy'; type 'help' for the list of commands"),
    ],
)
def test_unknown_commands_name_the_word_and_suggest_a_near_miss(line: str, message: str) -> None:
    with pytest.raises(CommandError) as info:
        parse(line)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lr", "lr needs a value, e.g. 'lr 1e-4'"),
        ("loss_scale", "loss_scale needs a value, e.g. 'loss_scale 1024'"),
        ("lr 1e-4 2e-4", "lr takes one value, got '1e-4 2e-4', e.g. 'lr 1e-4'"),
        ("lr abc", "lr: 'abc' is not a number"),
        ("loss_scale 1,5", "loss_scale: '1,5' is not a number"),
        ("lr 0", "lr must be a finite positive number, got '0'"),
        ("lr -1e-4", "lr must be a finite positive number, got '-1e-4'"),
        ("lr nan", "lr must be a finite positive number, got 'nan'"),
        ("loss_scale inf", "loss_scale must be a finite positive number, got 'inf'"),
        ("save now", "save takes no arguments, got 'now'"),
        ("help me please", "help takes no arguments, got 'me please'"),
        ("export a b", "export takes at most one name, got 'a b'"),
        ("time 500", "time takes nothing or 'to STEP', e.g. 'time to 5000'; got '500'"),
        ("time to", "time takes nothing or 'to STEP', e.g. 'time to 5000'; got 'to'"),
        ("time to soon", "time to: 'soon' is not a non-negative integer"),
        ("time to -3", "time to: '-3' is not a non-negative integer"),
        ("event", "event needs an action: 'event show', 'event clear' or 'event cancel ID'"),
        ("event shwo", "unknown event action 'shwo'; did you mean 'show'? "
                       "(use 'event show', 'event clear' or 'event cancel ID')"),
        ("event cancel", "event cancel needs one id, e.g. 'event cancel 3'"),
        ("event cancel x", "event cancel id: 'x' is not a non-negative integer"),
        ("event clear all", "event clear takes no arguments, got 'all'"),
        ("", "empty command; type 'help' for the list of commands"),
        ("   \t ", "empty command; type 'help' for the list of commands"),
    ],
)
def test_bad_arguments_get_one_message_naming_the_problem(line: str, message: str) -> None:
    with pytest.raises(CommandError) as info:
        parse(line)
    assert str(info.value) == message


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", ".hidden", "..", "x" * 101, "naïve", "a:b", "a$b"])
def test_export_names_cannot_leave_the_export_folder_or_break_file_names(name: str) -> None:
    with pytest.raises(CommandError, match=r"export: name .* is not allowed; use 1-100 letters"):
        parse(f"export {name}")


def test_export_name_of_the_longest_allowed_length_is_accepted() -> None:
    assert parse("export " + "x" * 100).arg == "x" * 100


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("save@100@200", "'save@100@200': only one '@STEP' is allowed"),
        ("save@", "'save@': '@' needs a step after it, e.g. 'save@100'"),
        ("@100", "'@100': '@STEP' needs a command before it, e.g. 'save@100'"),
        ("save@-5", "@STEP: '-5' is not a non-negative integer"),
        ("save@1.5", "@STEP: '1.5' is not a non-negative integer"),
        ("save@soon", "@STEP: 'soon' is not a non-negative integer"),
        ("sav@10", "unknown command 'sav'; did you mean 'save'?"),
        ("help@10", "help cannot be scheduled with '@': it is answered at once"),
        ("status@10", "status cannot be scheduled with '@': it is answered at once"),
        ("event show@10", "event cannot be scheduled with '@': it is answered at once"),
        ("event cancel 2@10", "event cannot be scheduled with '@': it is answered at once"),
        ("resume@10", "resume cannot be scheduled with '@': a paused run never reaches a new step"),
    ],
)
def test_scheduling_errors_are_named(line: str, message: str) -> None:
    with pytest.raises(CommandError) as info:
        parse(line)
    assert str(info.value) == message


def test_non_text_and_overlong_lines_are_refused() -> None:
    with pytest.raises(CommandError, match="a command must be text, got int"):
        parse(5)  # type: ignore[arg-type]
    with pytest.raises(CommandError, match=r"command too long \(1001 characters, at most 1000\)"):
        parse("x" * 1001)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "sav"}, "unknown command 'sav'; did you mean 'save'?"),
        ({"name": "lr"}, "lr needs a value, e.g. 'lr 1e-4'"),
        ({"name": "lr", "value": True}, "lr: expected a number, got True"),
        ({"name": "lr", "value": float("inf")}, "lr must be a finite positive number, got inf"),
        ({"name": "save", "value": 1.0}, "save takes no value"),
        ({"name": "save", "arg": "x"}, "save takes no argument, got 'x'"),
        ({"name": "save", "target": 3}, "save takes no target step"),
        ({"name": "event", "arg": "show", "target": 3}, "event show takes no id"),
        ({"name": "event", "arg": "cancel"}, "event cancel needs an id, e.g. 'event cancel 3'"),
        ({"name": "time", "target": -1}, "time to STEP must be a non-negative integer, got -1"),
        ({"name": "save", "at_step": -1}, "at_step must be a non-negative integer, got -1"),
        ({"name": "status", "at_step": 5}, "status cannot be scheduled with '@': it is answered at once"),
        ({"name": "export", "arg": "../x"}, "export: name '../x' is not allowed"),
    ],
)
def test_commands_built_directly_are_validated_too(kwargs: dict, message: str) -> None:
    with pytest.raises(CommandError) as info:
        Command(**kwargs)
    assert str(info.value).startswith(message)


def test_an_integer_value_is_stored_as_a_float() -> None:
    assert Command("loss_scale", value=8).value == 8.0
    assert isinstance(Command("loss_scale", value=8).value, float)


# ------------------------------------------------------------------------------ round trips

positive_floats = st.floats(min_value=5e-324, max_value=1e300, allow_nan=False, allow_infinity=False)
steps = st.integers(min_value=0, max_value=10**12)
export_names = st.from_regex(EXPORT_NAME_RE, fullmatch=True)


@st.composite
def commands(draw: st.DrawFn) -> Command:
    name = draw(st.sampled_from(COMMAND_NAMES))
    fields: dict = {}
    if name in ("lr", "loss_scale"):
        fields["value"] = draw(positive_floats)
    elif name == "export":
        fields["arg"] = draw(st.none() | export_names)
    elif name == "time":
        fields["target"] = draw(st.none() | steps)
    elif name == "event":
        fields["arg"] = draw(st.sampled_from(EVENT_ACTIONS))
        if fields["arg"] == "cancel":
            fields["target"] = draw(steps)
    if name not in UNSCHEDULABLE:
        fields["at_step"] = draw(st.none() | steps)
    return Command(name, **fields)


@SETTINGS
@given(commands())
def test_parse_inverts_to_line_for_every_command(command: Command) -> None:
    assert parse(command.to_line()) == command


@SETTINGS
@given(commands(), st.sampled_from([str.upper, str.title, str.lower]), st.sampled_from(["", " ", "  \t"]))
def test_case_and_spacing_of_the_command_word_do_not_change_the_command(command, recase, pad) -> None:
    body, sep, step = command.to_line().partition("@")
    word, space, rest = body.partition(" ")
    line = f"{pad}{recase(word)}{space}{rest}{pad}{sep and pad + sep + pad}{step}{pad}"
    assert parse(line) == command


@SETTINGS
@given(commands())
def test_a_json_line_request_gives_the_same_command(command: Command) -> None:
    assert from_request({"line": command.to_line()}) == command
    assert from_request(json.loads(json.dumps({"type": "command", "line": command.to_line()}))) == command


@SETTINGS
@given(st.text(max_size=60))
def test_any_text_parses_or_raises_a_command_error(line: str) -> None:
    try:
        command = parse(line)
    except CommandError as exc:
        assert str(exc)
    else:
        assert parse(command.to_line()) == command


# ------------------------------------------------------------------------------ JSON requests

@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"line": "lr 1e-4"}, Command("lr", value=1e-4)),
        ({"command": "lr", "value": 1e-4, "at_step": 500}, Command("lr", value=1e-4, at_step=500)),
        ({"command": "export", "name": "best"}, Command("export", arg="best")),
        ({"command": "export", "name": None}, Command("export")),
        ({"command": "save"}, Command("save")),
        ({"command": " SAVE ", "at_step": 3}, Command("save", at_step=3)),
        ({"type": "command", "command": "eval"}, Command("eval")),
        ({"command": "loss_scale", "value": 512}, Command("loss_scale", value=512.0)),
        ({"command": "lr", "value": "3e-4"}, Command("lr", value=3e-4)),
        ({"command": "save", "at_step": "40"}, Command("save", at_step=40)),
        ({"command": "time", "to": 900}, Command("time", target=900)),
        ({"command": "event", "action": "Cancel", "id": 4}, Command("event", arg="cancel", target=4)),
        ({"command": "event", "action": "show"}, Command("event", arg="show")),
    ],
)
def test_json_requests_build_the_same_commands_as_lines(body: dict, expected: Command) -> None:
    assert from_request(body) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "a command request must be a JSON object, got an array"),
        ("save", "a command request must be a JSON object, got a string"),
        ({}, "a command request needs 'line' or 'command'"),
        ({"comand": "save"}, "a command request needs 'line' or 'command'; did you mean 'command'?"),
        ({"type": "metrics", "line": "save"}, "a command request has type 'command', got 'metrics'"),
        ({"line": "save", "command": "save"}, "give either 'line' or 'command' with its fields, not both"),
        ({"line": "lr abc"}, "lr: 'abc' is not a number"),
        ({"line": 5}, "a command must be text, got int"),
        ({"command": 5}, "a command name must be text, got a number"),
        ({"command": "sav"}, "unknown command 'sav'; did you mean 'save'?"),
        ({"command": "lr"}, "lr needs a value, e.g. {\"value\": 0.0001}"),
        ({"command": "lr", "value": None}, "lr needs a value"),
        ({"command": "lr", "value": True}, "lr: 'value' must not be a boolean, got true"),
        ({"command": "lr", "value": "abc"}, "lr: 'abc' is not a number"),
        ({"command": "lr", "value": [1]}, "lr: expected a number, got [1]"),
        ({"command": "lr", "value": -1}, "lr must be a finite positive number, got -1"),
        ({"command": "save", "vlaue": 1}, "unknown field 'vlaue'; did you mean 'value'?"),
        ({"command": "save", "zzz": 1}, "unknown field 'zzz' (accepted: value, name, to, action, id, at_step)"),
        ({"command": "save", "value": 1}, "save does not take 'value'"),
        ({"command": "lr", "value": 1, "name": "x"}, "lr does not take 'name'"),
        ({"command": "export", "name": 7}, "export: 'name' must be text, got a number"),
        ({"command": "export", "name": "a/b"}, "export: name 'a/b' is not allowed"),
        ({"command": "save", "at_step": 1.5}, "at_step must be a non-negative integer, got 1.5"),
        ({"command": "save", "at_step": -2}, "at_step must be a non-negative integer, got -2"),
        ({"command": "save", "at_step": False}, "save: 'at_step' must not be a boolean, got false"),
        ({"command": "save", "at_step": "x"}, "at_step: 'x' is not a non-negative integer"),
        ({"command": "status", "at_step": 5}, "status cannot be scheduled with '@'"),
        ({"command": "event"}, "event needs an action"),
        ({"command": "event", "action": "cancel"}, "event cancel needs an id"),
        ({"command": "event", "action": "nope"}, "unknown event action 'nope'"),
    ],
)
def test_bad_json_requests_get_one_clear_message(body: object, message: str) -> None:
    with pytest.raises(CommandError) as info:
        from_request(body)
    assert str(info.value).startswith(message)


def test_rest_names_with_optional_bodies() -> None:
    assert from_name("save") == Command("save")
    assert from_name("save", {}) == Command("save")
    assert from_name("lr", {"value": 0.5}) == Command("lr", value=0.5)
    assert from_name("export", {"name": "best", "at_step": 9}) == Command("export", arg="best", at_step=9)
    with pytest.raises(CommandError, match="the body of 'lr' must be a JSON object, got an array"):
        from_name("lr", [0.5])  # type: ignore[arg-type]
    with pytest.raises(CommandError, match="unknown field 'command'"):
        from_name("save", {"command": "eval"})
    with pytest.raises(CommandError, match="unknown field 'line'"):
        from_name("save", {"line": "eval"})
