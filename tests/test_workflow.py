"""Workflow definitions: loading, validation that reports every problem, and DAG decisions."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frys_edge.core import FrysError
from frys_edge.expr import Template
from frys_edge.workflow import (
    DefinitionError,
    Problem,
    RetrySpec,
    Workflow,
    WorkflowError,
    coerce_inputs,
    load_workflow,
    parse_input_pair,
    parse_workflow,
    ready_steps,
    run_outcome,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "workflows"
ACTIONS = {"log", "sleep", "kv.get", "kv.put", "emit", "wait_event", "http", "workflow"}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems_in(path: Path) -> list[Problem]:
    with pytest.raises(DefinitionError) as caught:
        load_workflow(path, ACTIONS)
    return caught.value.problems


def steps(*specs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A definition dict of the given steps, each with action `log` unless it names one."""
    return {"name": "w", "steps": [{"action": "log", **spec} for spec in specs], **fields}


def parse(data: dict[str, Any]) -> Workflow:
    return parse_workflow(data, ACTIONS)


def problems_of(data: Any) -> list[Problem]:
    with pytest.raises(DefinitionError) as caught:
        parse_workflow(data, ACTIONS)
    return caught.value.problems


# --- the examples -----------------------------------------------------------------------------


def test_design_doc_example_parses_and_is_rejected_naming_vector_search() -> None:
    with pytest.raises(DefinitionError) as caught:
        load_workflow(EXAMPLES / "design_doc.yaml", ACTIONS)
    (problem,) = caught.value.problems
    assert problem.path == "steps[0].action"
    assert problem.line == 4
    assert "vector_search" in problem.message
    assert "emit, http, kv.get, kv.put, log, sleep, wait_event, workflow" in problem.message
    assert str(caught.value).startswith(f"{EXAMPLES / 'design_doc.yaml'}: 1 problem:\n  ")


def test_design_doc_example_validates_once_vector_search_is_an_action() -> None:
    workflow = load_workflow(EXAMPLES / "design_doc.yaml", {*ACTIONS, "vector_search"})
    assert workflow.spec.name == "test_workflow"
    assert workflow.params["step1"] == {"query": "test query"}
    assert workflow.spec.steps[0].retry is None


def test_diamond_loads_with_an_order_that_respects_needs() -> None:
    workflow = load_workflow(EXAMPLES / "diamond.yaml", ACTIONS)
    assert workflow.order == ["a", "b", "c", "d"]
    assert workflow.dependants == {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}
    assert workflow.spec.inputs["greeting"].default == "hello"
    assert isinstance(workflow.outputs["d"], Template)
    assert workflow.conditions == {"a": None, "b": None, "c": None, "d": None}


def test_order_keeps_definition_order_among_independent_steps() -> None:
    workflow = parse(steps({"name": "z", "needs": ["y"]}, {"name": "x"}, {"name": "y"}))
    assert workflow.order == ["x", "y", "z"]


# --- ready steps and outcomes -----------------------------------------------------------------


def test_ready_steps_progress_through_the_diamond() -> None:
    workflow = load_workflow(EXAMPLES / "diamond.yaml", ACTIONS)
    assert ready_steps(workflow, {}) == ["a"]
    assert ready_steps(workflow, {"a": "running"}) == []
    assert ready_steps(workflow, {"a": "succeeded"}) == ["b", "c"]
    assert ready_steps(workflow, {"a": "succeeded", "b": "succeeded", "c": "running"}) == []
    states = {"a": "succeeded", "b": "succeeded", "c": "skipped"}
    assert ready_steps(workflow, states) == ["d"]
    assert ready_steps(workflow, {**states, "d": "succeeded"}) == []


def test_a_failed_step_blocks_its_dependants_unless_it_continues_on_error() -> None:
    blocking = parse(steps({"name": "a"}, {"name": "b", "needs": ["a"]}))
    assert ready_steps(blocking, {"a": "failed"}) == []
    assert run_outcome(blocking, {"a": "failed"}) == "failed"
    lenient = parse(steps({"name": "a", "on_error": "continue"}, {"name": "b", "needs": ["a"]}))
    assert ready_steps(lenient, {"a": "failed"}) == ["b"]
    assert run_outcome(lenient, {"a": "failed"}) is None
    assert run_outcome(lenient, {"a": "failed", "b": "succeeded"}) == "succeeded"


@pytest.mark.parametrize(
    ("states", "outcome"),
    [
        ({}, None),
        ({"a": "running"}, None),
        ({"a": "succeeded", "b": "waiting"}, None),
        ({"a": "succeeded", "b": "succeeded", "c": "succeeded", "d": "succeeded"}, "succeeded"),
        ({"a": "succeeded", "b": "skipped", "c": "skipped", "d": "skipped"}, "succeeded"),
        ({"a": "succeeded", "b": "failed", "c": "running"}, "failed"),
        ({"a": "succeeded", "b": "cancelled", "c": "succeeded"}, "cancelled"),
        ({"a": "succeeded", "b": "failed", "c": "cancelled"}, "failed"),
    ],
)
def test_run_outcome(states: dict[str, str], outcome: str | None) -> None:
    workflow = load_workflow(EXAMPLES / "diamond.yaml", ACTIONS)
    assert run_outcome(workflow, states) == outcome


def test_run_outcome_counts_a_failure_that_continues_as_done() -> None:
    workflow = parse(steps({"name": "a", "on_error": "continue"}, {"name": "b"}))
    assert run_outcome(workflow, {"a": "failed", "b": "succeeded"}) == "succeeded"
    assert run_outcome(workflow, {"a": "failed", "b": "running"}) is None


# --- validation: every kind of problem, with its path and line --------------------------------

# Each case: the YAML, then the path, line and a part of the message of its only problem.
VALIDATION_CASES = {
    "out_of_range": (
        """
        name: w
        steps:
          - name: a
            action: log
            retry:
              max_attempts: -1
        """,
        "steps[0].retry.max_attempts",
        6,
        "expected int >= 1, got -1",
    ),
    "wrong_type": (
        """
        name: w
        steps:
          - name: a
            action: log
            timeout: soon
        """,
        "steps[0].timeout",
        5,
        'got str "soon"',
    ),
    "wrong_type_in_a_list": (
        """
        name: w
        steps:
          - name: a
            action: log
          - name: b
            action: log
            needs:
              - a
              - 3
        """,
        "steps[1].needs[1]",
        9,
        "expected str, got int",
    ),
    "choice": (
        """
        name: w
        steps:
          - name: a
            action: log
            on_error: ignore
        """,
        "steps[0].on_error",
        5,
        'expected one of "fail", "continue", got "ignore"',
    ),
    "unknown_field": (
        """
        name: w
        steps:
          - name: a
            action: log
            retries: 3
        """,
        "steps[0].retries",
        5,
        "unknown field 'retries'; did you mean 'retry'?",
    ),
    "missing_field": (
        """
        name: w
        steps:
          - name: a
        """,
        "steps[0].action",
        3,
        "required field is missing",
    ),
    "unknown_action": (
        """
        name: w
        steps:
          - name: a
            action: kv.putt
        """,
        "steps[0].action",
        4,
        "unknown action 'kv.putt'; did you mean 'kv.put'?",
    ),
    "duplicate_step": (
        """
        name: w
        steps:
          - name: a
            action: log
          - name: a
            action: log
        """,
        "steps[1].name",
        5,
        "duplicate step name 'a' (also steps[0])",
    ),
    "unknown_need": (
        """
        name: w
        steps:
          - name: read
            action: log
          - name: filter
            action: log
            needs: [reed]
        """,
        "steps[1].needs[0]",
        7,
        "unknown step 'reed' (steps: read, filter)",
    ),
    "bad_step_name": (
        """
        name: w
        steps:
          - name: 2nd step
            action: log
        """,
        "steps[0].name",
        3,
        "expected a name of letters, digits",
    ),
    "no_steps": (
        """
        name: w
        steps: []
        """,
        "steps",
        2,
        "expected array of length >= 1",
    ),
    "expression_syntax": (
        """
        name: w
        steps:
          - name: a
            action: log
            params:
              message: "${{ inputs. }}"
        """,
        "steps[0].params.message",
        6,
        "bad expression",
    ),
    "condition_syntax": (
        """
        name: w
        steps:
          - name: a
            action: log
            if: inputs.x ==
        """,
        "steps[0].if",
        5,
        "bad expression",
    ),
    "undeclared_input": (
        """
        name: w
        inputs:
          limit: {type: number}
        steps:
          - name: a
            action: log
            params:
              message: "${{ inputs.limt }}"
        """,
        "steps[0].params.message",
        8,
        "unknown input 'limt'; did you mean 'limit'?",
    ),
    "unknown_step_reference": (
        """
        name: w
        steps:
          - name: a
            action: log
            params:
              message: "${{ steps.b.output }}"
        """,
        "steps[0].params.message",
        6,
        "unknown step 'b'",
    ),
    "reference_not_upstream": (
        """
        name: w
        steps:
          - name: a
            action: log
          - name: b
            action: log
            if: ${{ steps.a.status == 'succeeded' }}
        """,
        "steps[1].if",
        7,
        "step 'a' does not run before 'b'; add it to `needs`",
    ),
    "reference_to_itself": (
        """
        name: w
        steps:
          - name: a
            action: log
            params:
              message: "${{ steps.a.output }}"
        """,
        "steps[0].params.message",
        6,
        "a step cannot read its own result",
    ),
    "reference_to_step_field": (
        """
        name: w
        steps:
          - name: a
            action: log
          - name: b
            action: log
            needs: [a]
            params:
              message: "${{ steps.a.result }}"
        """,
        "steps[1].params.message",
        9,
        "expected steps.a.output or steps.a.status",
    ),
    "run_field": (
        """
        name: w
        steps:
          - name: a
            action: log
            params:
              message: "${{ run.attempt }}"
        """,
        "steps[0].params.message",
        6,
        "run has only id, started_at, workflow",
    ),
    "output_reference": (
        """
        name: w
        steps:
          - name: a
            action: log
        outputs:
          result: "${{ steps.b.output }}"
        """,
        "outputs.result",
        6,
        "unknown step 'b'",
    ),
    "event_trigger_without_topic": (
        """
        name: w
        triggers:
          - type: event
        steps:
          - name: a
            action: log
        """,
        "triggers[0].topic",
        3,
        "required for event triggers",
    ),
    "bad_topic_pattern": (
        """
        name: w
        triggers:
          - type: event
            topic: "sensors/#/temp"
        steps:
          - name: a
            action: log
        """,
        "triggers[0].topic",
        4,
        "'#' must be the last level",
    ),
    "cron_fields": (
        """
        name: w
        triggers:
          - type: cron
            cron: "*/5 * * *"
        steps:
          - name: a
            action: log
        """,
        "triggers[0].cron",
        4,
        "expected 5 fields",
    ),
    "field_of_another_trigger_type": (
        """
        name: w
        triggers:
          - type: interval
            every: 10
            topic: sensors/+
        steps:
          - name: a
            action: log
        """,
        "triggers[0].topic",
        5,
        "only event triggers take 'topic'",
    ),
    "input_default_of_wrong_type": (
        """
        name: w
        inputs:
          limit:
            type: integer
            default: "ten"
        steps:
          - name: a
            action: log
        """,
        "inputs.limit.default",
        5,
        'expected integer, got str "ten"',
    ),
    "version_as_float": (
        """
        name: w
        version: 1.5
        steps:
          - name: a
            action: log
        """,
        "version",
        2,
        "expected str, got float 1.5",
    ),
    "param_key_not_text": (
        """
        name: w
        steps:
          - name: a
            action: log
            params:
              1: one
        """,
        "steps[0].params",
        5,
        "expected str keys, got int",
    ),
    "step_not_a_mapping": (
        """
        name: w
        steps:
          - just a string
        """,
        "steps[0]",
        3,
        'expected a mapping of fields, got str "just a string"',
    ),
}


@pytest.mark.parametrize(
    ("text", "path", "line", "message"),
    VALIDATION_CASES.values(),
    ids=VALIDATION_CASES.keys(),
)
def test_validation_names_the_problem_with_its_path_and_line(
    tmp_path: Path, text: str, path: str, line: int, message: str
) -> None:
    (problem,) = problems_in(write(tmp_path, "w.yaml", text))
    assert (problem.path, problem.line) == (path, line)
    assert message in problem.message


def test_a_definition_with_two_problems_reports_both(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "test.yaml",
        """
        name: w
        steps:
          - name: read
            action: log
            retry: {max_attempts: -1}
          - name: filter
            action: vector_search
            needs: [reed]
        """,
    )
    with pytest.raises(DefinitionError) as caught:
        load_workflow(path, ACTIONS)
    error = caught.value
    assert [(p.path, p.line) for p in error.problems] == [
        ("steps[0].retry.max_attempts", 5),
        ("steps[1].action", 7),
        ("steps[1].needs[0]", 8),
    ]
    assert error.source == str(path)
    lines = str(error).splitlines()
    assert lines[0] == f"{path}: 3 problems:"
    assert lines[3] == f"  {path}:8: steps[1].needs[0]: unknown step 'reed' (steps: read, filter)"


def test_a_cycle_names_its_steps_in_run_order() -> None:
    data = steps(
        {"name": "a", "needs": ["c"]},
        {"name": "b", "needs": ["a"]},
        {"name": "c", "needs": ["b"]},
        {"name": "after", "needs": ["c"]},
    )
    (problem,) = problems_of(data)
    assert problem.path == "steps[0].needs[0]"
    assert problem.message == "cycle: a -> b -> c -> a"


def test_a_step_that_needs_itself_is_a_cycle() -> None:
    (problem,) = problems_of(steps({"name": "a", "needs": ["a"]}))
    assert problem.message == "cycle: a -> a"


def test_each_separate_cycle_is_reported() -> None:
    data = steps(
        {"name": "a", "needs": ["b"]},
        {"name": "b", "needs": ["a"]},
        {"name": "c", "needs": ["d"]},
        {"name": "d", "needs": ["c"]},
    )
    assert [p.message for p in problems_of(data)] == ["cycle: a -> b -> a", "cycle: c -> d -> c"]


def test_a_bad_type_elsewhere_in_a_step_hides_no_graph_problem() -> None:
    data = steps({"name": "a", "needs": ["a"], "timeout": -1, "action": "nope"})
    assert [p.path for p in problems_of(data)] == [
        "steps[0].timeout",
        "steps[0].action",
        "steps[0].needs[0]",
    ]


def test_outputs_may_read_any_step_and_steps_may_read_their_upstream() -> None:
    workflow = parse(
        steps(
            {"name": "a"},
            {"name": "b", "needs": ["a"]},
            {"name": "c", "needs": ["b"], "params": {"v": "${{ steps.a.output.x }}"}},
            {"name": "d", "if": "steps.a.status == 'failed'", "needs": ["c"]},
            outputs={"first": "${{ steps.a.output }}", "run": "${{ run.id }}"},
        )
    )
    assert isinstance(workflow.params["c"]["v"], Template)
    assert isinstance(workflow.conditions["d"], Template)


def test_unknown_top_level_field_lists_the_known_ones() -> None:
    (problem,) = problems_of(steps({"name": "a"}, stesp=[]))
    assert problem.path == "stesp"
    assert "did you mean 'steps'?" in problem.message


def test_a_definition_that_is_not_a_mapping_is_one_problem() -> None:
    (problem,) = problems_of(["name", "w"])
    assert problem == Problem(
        "", None, 'expected a mapping of workflow fields, got array ["name","w"]'
    )


def test_missing_name_and_steps_are_both_reported() -> None:
    assert [p.path for p in problems_of({})] == ["name", "steps"]


def test_an_integer_version_is_read_as_text() -> None:
    assert parse(steps({"name": "a"}, version=3)).spec.version == "3"


def test_retry_defaults_fill_the_fields_not_given() -> None:
    workflow = parse(steps({"name": "a", "retry": {"max_attempts": 3}}))
    assert workflow.steps["a"].retry == RetrySpec(max_attempts=3)


def test_problem_format_leaves_out_what_is_unknown() -> None:
    assert Problem("steps[0]", 3, "bad").format("w.yaml") == "w.yaml:3: steps[0]: bad"
    assert str(Problem("steps[0]", 3, "bad")) == "line 3: steps[0]: bad"
    assert str(Problem("", None, "bad")) == "bad"


def test_definition_errors_are_frys_errors() -> None:
    assert issubclass(DefinitionError, WorkflowError)
    assert issubclass(WorkflowError, FrysError)


# --- file formats -----------------------------------------------------------------------------

DIAMOND_JSON = """
{
  "name": "diamond",
  "inputs": {"n": {"type": "integer", "default": 1}},
  "steps": [
    {"name": "a", "action": "log"},
    {"name": "b", "action": "log", "needs": ["a"]},
    {"name": "c", "action": "log", "needs": ["a"]},
    {"name": "d", "action": "kv.put", "needs": ["b", "c"],
     "params": {"key": "d", "value": "${{ inputs.n }}"}}
  ],
  "outputs": {"d": "${{ steps.d.output }}"}
}
"""

DIAMOND_TOML = """
name = "diamond"
outputs = { d = "${{ steps.d.output }}" }

[inputs.n]
type = "integer"
default = 1

[[steps]]
name = "a"
action = "log"

[[steps]]
name = "b"
action = "log"
needs = ["a"]

[[steps]]
name = "c"
action = "log"
needs = ["a"]

[[steps]]
name = "d"
action = "kv.put"
needs = ["b", "c"]
params = { key = "d", value = "${{ inputs.n }}" }
"""


@pytest.mark.parametrize(("name", "text"), [("d.json", DIAMOND_JSON), ("d.toml", DIAMOND_TOML)])
def test_json_and_toml_files_load(tmp_path: Path, name: str, text: str) -> None:
    workflow = load_workflow(write(tmp_path, name, text), ACTIONS)
    assert workflow.order == ["a", "b", "c", "d"]
    assert workflow.spec.inputs["n"].default == 1
    assert workflow.spec == parse(json.loads(DIAMOND_JSON)).spec


def test_json_problems_have_lines(tmp_path: Path) -> None:
    text = DIAMOND_JSON.replace('"needs": ["a"]}', '"needs": ["x"]}', 1)
    text = text.replace('"default": 1', '"default": "one"')
    problems = problems_in(write(tmp_path, "d.json", text))
    assert [(p.path, p.line) for p in problems] == [
        ("inputs.n.default", 3),
        ("steps[1].needs[0]", 6),
    ]


def test_toml_problems_have_lines(tmp_path: Path) -> None:
    text = DIAMOND_TOML.replace('needs = ["a"]', 'needs = ["x"]', 1)
    text = text.replace('action = "log"', 'action = "lgo"', 1)
    problems = problems_in(write(tmp_path, "d.toml", text))
    assert [(p.path, p.line) for p in problems] == [
        ("steps[0].action", 10),
        ("steps[1].needs[0]", 15),
    ]


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("bad.yaml", "name: w\nsteps:\n  - name: a\n    action: [log\n", 5),
        ("bad.yaml", "name: w\nsteps:\n  - name: a\n   action: log\n", 4),
        ("bad.json", '{\n  "name": "w",\n  "steps": [\n}\n', 4),
        ("bad.toml", 'name = "w"\n[[steps]]\nname = \n', 3),
    ],
)
def test_syntax_errors_give_the_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    path = tmp_path / name
    path.write_text(text)
    (problem,) = problems_in(path)
    assert problem.line == line
    assert "syntax error" in problem.message
    assert problem.path == ""


def test_an_empty_yaml_file_is_a_problem(tmp_path: Path) -> None:
    (problem,) = problems_in(write(tmp_path, "empty.yaml", ""))
    assert "got null" in problem.message


def test_an_unknown_extension_or_missing_file_is_a_workflow_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"use \.yaml, \.yml, \.json or \.toml"):
        load_workflow(tmp_path / "w.txt", ACTIONS)
    with pytest.raises(WorkflowError, match="cannot read workflow definition"):
        load_workflow(tmp_path / "missing.yaml", ACTIONS)


# --- inputs -----------------------------------------------------------------------------------

INPUTS = steps(
    {"name": "a"},
    inputs={
        "limit": {"type": "integer", "default": 10},
        "label": {"type": "string"},
        "ratio": {"type": "number", "default": 0.5},
        "on": {"type": "boolean", "default": False},
    },
)


def test_coerce_inputs_applies_defaults() -> None:
    values = coerce_inputs(parse(INPUTS), {"label": "x", "ratio": 2})
    assert values == {"limit": 10, "label": "x", "ratio": 2, "on": False}


def test_coerce_inputs_lists_every_problem() -> None:
    with pytest.raises(DefinitionError) as caught:
        coerce_inputs(parse(INPUTS), {"limit": "ten", "lable": "x", "ratio": True})
    assert [str(problem) for problem in caught.value.problems] == [
        "inputs.lable: unknown input 'lable'; did you mean 'label'?"
        " (known: limit, label, ratio, on)",
        'inputs.limit: expected integer, got str "ten"',
        "inputs.label: required input is missing",
        "inputs.ratio: expected number, got bool true",
    ]
    assert str(caught.value).startswith("invalid inputs for workflow 'w': 4 problems:")


def test_a_boolean_is_not_an_integer() -> None:
    with pytest.raises(DefinitionError, match="expected integer, got bool true"):
        coerce_inputs(parse(INPUTS), {"label": "x", "limit": True})


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("n=3", ("n", 3)),
        ("name=hello", ("name", "hello")),
        ('tags=["a","b"]', ("tags", ["a", "b"])),
        ("eq=a=b", ("eq", "a=b")),
        ("empty=", ("empty", "")),
        ("flag=true", ("flag", True)),
    ],
)
def test_parse_input_pair(text: str, pair: tuple[str, Any]) -> None:
    assert parse_input_pair(text) == pair


@pytest.mark.parametrize("text", ["novalue", "=3"])
def test_parse_input_pair_needs_a_key_and_an_equals_sign(text: str) -> None:
    with pytest.raises(WorkflowError, match="key=value"):
        parse_input_pair(text)


# --- stored definitions -----------------------------------------------------------------------


def test_to_json_and_from_json_round_trip() -> None:
    workflow = load_workflow(EXAMPLES / "diamond.yaml", ACTIONS)
    data = parse(
        steps(
            {"name": "a", "retry": {"max_attempts": 3, "jitter": False}, "timeout": 2.5},
            {"name": "b", "needs": ["a"], "if": "${{ steps.a.status == 'succeeded' }}"},
            triggers=[{"type": "interval", "every": 30, "missed": "run_once"}],
            concurrency=2,
        )
    )
    for original in (workflow, data):
        stored = original.to_json()
        assert json.loads(stored)["name"] == original.spec.name
        again = Workflow.from_json(stored, ACTIONS)
        assert again.spec == original.spec
        assert again.order == original.order


def test_from_json_validates_against_the_actions_known_now() -> None:
    stored = parse(steps({"name": "a", "action": "http"})).to_json()
    with pytest.raises(DefinitionError, match="unknown action 'http'"):
        Workflow.from_json(stored, {"log"})


# --- properties of the DAG --------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """Steps s0..sN-1 with edges only from earlier to later nodes, listed in shuffled order."""
    count = draw(st.integers(1, 8))
    edges = draw(
        st.lists(
            st.tuples(st.integers(0, count - 1), st.integers(0, count - 1)).filter(
                lambda edge: edge[0] < edge[1]
            ),
            unique=True,
            max_size=20,
        )
    )
    specs = [
        {"name": f"s{i}", "action": "log", "needs": [f"s{a}" for a, b in edges if b == i]}
        for i in range(count)
    ]
    return draw(st.permutations(specs)), edges


@given(dags(), st.randoms(use_true_random=False))
def test_order_is_topological_and_ready_steps_wait_for_needs(
    dag: tuple[list[dict[str, Any]], list[tuple[int, int]]], random: Any
) -> None:
    specs, _ = dag
    workflow = parse({"name": "w", "steps": specs})
    position = {name: i for i, name in enumerate(workflow.order)}
    assert sorted(workflow.order) == sorted(spec["name"] for spec in specs)
    for spec in specs:
        assert all(position[need] < position[spec["name"]] for need in spec["needs"])

    states: dict[str, str] = {}
    while run_outcome(workflow, states) is None:
        ready = ready_steps(workflow, states)
        assert ready, "a run with work left always has a ready step when nothing runs"
        for name in ready:
            assert all(states.get(need) == "succeeded" for need in workflow.steps[name].needs)
        states[random.choice(ready)] = "succeeded"
    assert run_outcome(workflow, states) == "succeeded"


@given(dags(), st.data())
def test_adding_a_back_edge_always_yields_a_cycle(
    dag: tuple[list[dict[str, Any]], list[tuple[int, int]]], data: st.DataObject
) -> None:
    specs, edges = dag
    early, late = data.draw(st.sampled_from(edges or [(0, 0)]))  # (0, 0): a step needs itself
    looped = [
        {**spec, "needs": [*spec["needs"], f"s{late}"]} if spec["name"] == f"s{early}" else spec
        for spec in specs
    ]
    problems = problems_of({"name": "w", "steps": looped})
    assert problems
    assert all(problem.message.startswith("cycle: ") for problem in problems)
