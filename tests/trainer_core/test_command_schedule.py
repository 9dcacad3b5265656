"""Commands scheduled for a step: ordering, cancel, clear and the checkpointed state."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_core import command_schedule, commands
from trainer_core.command_schedule import ScheduledCommand, Scheduler, SchedulerStateError
from trainer_core.commands import Command, CommandError, parse


def test_the_scheduler_is_importable_from_the_commands_module() -> None:
    assert commands.Scheduler is Scheduler
    assert commands.ScheduledCommand is ScheduledCommand
    assert commands.SchedulerStateError is SchedulerStateError
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = commands.Nope


def test_due_commands_come_out_in_step_then_id_order() -> None:
    scheduler = Scheduler()
    for line in ["save@10", "eval@5", "lr 0.1@5", "quit@20"]:
        scheduler.add(parse(line), current_step=0)
    assert scheduler.due(4) == []
    assert [e.command.to_line() for e in scheduler.due(5)] == ["eval", "lr 0.1"]
    assert [e.command.to_line() for e in scheduler.due(15)] == ["save"]
    assert len(scheduler) == 1 and scheduler.next_step() == 20
    assert [e.command for e in scheduler.due(10**9)] == [Command("quit")]
    assert scheduler.next_step() is None


def test_added_entries_get_increasing_ids_and_lose_their_at_step() -> None:
    scheduler = Scheduler()
    first = scheduler.add(parse("save@3"), current_step=0)
    second = scheduler.add(parse("save@3"), current_step=0)
    assert (first.id, second.id) == (1, 2)
    assert first == ScheduledCommand(1, 3, Command("save"))


def test_a_step_already_passed_is_refused_and_the_current_step_is_accepted() -> None:
    scheduler = Scheduler()
    with pytest.raises(CommandError, match=r"save@4: step 4 has passed \(the run is at step 5\)"):
        scheduler.add(parse("save@4"), current_step=5)
    assert scheduler.add(parse("save@5"), current_step=5).step == 5
    assert [e.step for e in scheduler.due(5)] == [5]


def test_only_commands_with_a_step_can_be_scheduled() -> None:
    with pytest.raises(CommandError, match="only a command with '@STEP' can be scheduled"):
        Scheduler().add(parse("save"), current_step=0)


def test_cancel_removes_one_entry_and_unknown_ids_are_named() -> None:
    scheduler = Scheduler()
    keep = scheduler.add(parse("save@3"), 0)
    drop = scheduler.add(parse("eval@2"), 0)
    assert scheduler.cancel(drop.id) == drop
    with pytest.raises(CommandError, match=r"no scheduled command with id 2 \(scheduled ids: 1\)"):
        scheduler.cancel(drop.id)
    assert scheduler.due(10) == [keep]
    with pytest.raises(CommandError, match=r"scheduled ids: none"):
        scheduler.cancel(1)


def test_clear_drops_everything_and_says_how_many() -> None:
    scheduler = Scheduler()
    for step in (1, 2, 3):
        scheduler.add(Command("save", at_step=step), 0)
    assert scheduler.clear() == 3
    assert scheduler.clear() == 0
    assert scheduler.due(100) == [] and scheduler.show() == []


def test_show_is_json_and_lists_entries_in_run_order() -> None:
    scheduler = Scheduler()
    scheduler.add(parse("export best@30"), 0)
    scheduler.add(parse("lr 1e-5@20"), 0)
    shown = scheduler.show()
    assert json.loads(json.dumps(shown)) == shown == [
        {"id": 2, "step": 20, "line": "lr 1e-05"},
        {"id": 1, "step": 30, "line": "export best"},
    ]


def test_scheduled_commands_survive_a_state_dict_round_trip_through_json() -> None:
    scheduler = Scheduler()
    scheduler.add(parse("save@30"), 0)
    cancelled = scheduler.add(parse("eval@10"), 0)
    scheduler.add(parse("lr 0.5@10"), 0)
    scheduler.cancel(cancelled.id)
    restored = Scheduler()
    restored.load_state_dict(json.loads(json.dumps(scheduler.state_dict())))
    assert restored.show() == scheduler.show()
    assert restored.add(parse("quit@40"), 0).id == 4, "ids keep increasing after a resume"
    assert [e.command.to_line() for e in restored.due(30)] == ["lr 0.5", "save"]


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([], "scheduler state must be a mapping, got list"),
        ({"version": 1, "next_id": 1}, "scheduler state keys must be"),
        ({"version": 2, "next_id": 1, "scheduled": []}, "scheduler state version 2 is not 1"),
        ({"version": 1, "next_id": 0, "scheduled": []}, "'next_id' must be a positive integer, got 0"),
        ({"version": 1, "next_id": True, "scheduled": []}, "'next_id' must be a positive integer, got True"),
        ({"version": 1, "next_id": 1, "scheduled": {}}, "'scheduled' must be a list"),
        ({"version": 1, "next_id": 3, "scheduled": [{"id": 1, "step": 2}]}, "scheduled[0] must be a mapping"),
        ({"version": 1, "next_id": 3, "scheduled": [{"id": "1", "step": 2, "line": "save"}]},
         "scheduled[0].id must be a non-negative integer, got '1'"),
        ({"version": 1, "next_id": 3, "scheduled": [{"id": 1, "step": -2, "line": "save"}]},
         "scheduled[0].step must be a non-negative integer, got -2"),
        ({"version": 1, "next_id": 3, "scheduled": [{"id": 1, "step": 2, "line": "sav"}]},
         "scheduled[0].line: unknown command 'sav'; did you mean 'save'?"),
        ({"version": 1, "next_id": 3, "scheduled": [{"id": 1, "step": 2, "line": "save@4"}]},
         "scheduled[0].line: 'save@4' is not a schedulable command"),
        ({"version": 1, "next_id": 3, "scheduled": [{"id": 1, "step": 2, "line": "status"}]},
         "scheduled[0].line: 'status' is not a schedulable command"),
        ({"version": 1, "next_id": 3, "scheduled": [{"id": 1, "step": 2, "line": "save"},
                                                    {"id": 1, "step": 3, "line": "eval"}]},
         "scheduler state has duplicate ids: [1, 1]"),
        ({"version": 1, "next_id": 2, "scheduled": [{"id": 5, "step": 2, "line": "save"}]},
         "scheduler state id 5 is not below next_id 2"),
    ],
)
def test_a_corrupt_state_is_refused_whole_and_leaves_the_scheduler_unchanged(state: object, message: str) -> None:
    scheduler = Scheduler()
    scheduler.add(parse("save@7"), 0)
    before = scheduler.state_dict()
    with pytest.raises(SchedulerStateError) as info:
        scheduler.load_state_dict(state)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert scheduler.state_dict() == before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "due", "cancel"]), st.integers(0, 30)), max_size=40))
def test_the_scheduler_behaves_like_a_sorted_list(operations: list[tuple[str, int]]) -> None:
    scheduler, model, next_id = Scheduler(), [], 1
    for op, number in operations:
        if op == "add":
            scheduler.add(Command("save", at_step=number), current_step=0)
            model.append((number, next_id))
            next_id += 1
        elif op == "due":
            expected = sorted(e for e in model if e[0] <= number)
            assert [(e.step, e.id) for e in scheduler.due(number)] == expected
            model = [e for e in model if e[0] > number]
        elif any(e[1] == number for e in model):
            scheduler.cancel(number)
            model = [e for e in model if e[1] != number]
        else:
            with pytest.raises(CommandError):
                scheduler.cancel(number)
        assert [(e["step"], e["id"]) for e in scheduler.show()] == sorted(model)
        assert scheduler.next_step() == (min(model)[0] if model else None)


def test_many_cancelled_entries_do_not_pile_up_in_the_heap() -> None:
    scheduler = Scheduler()
    keep = scheduler.add(parse("save@5000"), 0)
    for step in range(1000):
        scheduler.cancel(scheduler.add(Command("eval", at_step=step), 0).id)
    assert len(scheduler._heap) <= 2 * len(scheduler) + 64
    assert scheduler.due(10**6) == [keep]


def test_the_number_of_scheduled_commands_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command_schedule, "MAX_SCHEDULED", 3)
    scheduler = Scheduler()
    for step in range(3):
        scheduler.add(Command("save", at_step=step), 0)
    with pytest.raises(CommandError, match=r"too many scheduled commands \(3\); cancel some with 'event clear'"):
        scheduler.add(Command("save", at_step=9), 0)
