"""workflow: owns workflow definitions (the model, loading YAML / JSON / TOML files and dicts,
validation that reports every problem at once) and the pure DAG decisions (order, which steps are
ready, how a run ended); it must not run anything nor do I/O beyond reading a definition file.

Validation walks the definition field by field, using msgspec for each field's type and bounds,
so that one bad value never hides another. Every problem carries its path
(`steps[2].retry.max_attempts`) and, for files, the line of that path or of its nearest parent.
"""

from __future__ import annotations

import difflib
import heapq
import json
import os
import re
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
import yaml
from cronsim import CronSim, CronSimError

from frys_edge.core import FrysError, validate_pattern
from frys_edge.expr import (
    ExpressionError,
    Reference,
    Template,
    compile_condition,
    compile_template,
    compile_value,
)

__all__ = [
    "DefinitionError",
    "InputSpec",
    "Problem",
    "RetrySpec",
    "StepSpec",
    "TriggerSpec",
    "Workflow",
    "WorkflowError",
    "WorkflowSpec",
    "coerce_inputs",
    "load_workflow",
    "parse_input_pair",
    "parse_workflow",
    "ready_steps",
    "run_outcome",
]

_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
_Name = Annotated[str, msgspec.Meta(pattern=_NAME_PATTERN)]
_Positive = Annotated[float, msgspec.Meta(gt=0)]
_RUN_FIELDS = frozenset({"id", "workflow", "started_at"})
_STEP_FIELDS = ("output", "status")

_InputType = Literal["string", "number", "integer", "boolean", "object", "array", "any"]


class RetrySpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How a failed step is retried: delays grow by `multiplier` from `initial_delay`."""

    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 1
    initial_delay: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    max_delay: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    multiplier: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    jitter: bool = True


class InputSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A declared input of a workflow; without a default it is required."""

    type: _InputType = "any"
    default: Any = msgspec.UNSET
    description: str = ""


class TriggerSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What starts a run: an event topic, an interval in seconds, or a cron schedule."""

    type: Literal["event", "interval", "cron"]
    topic: str | None = None
    every: _Positive | None = None
    cron: str | None = None
    # What to do with fires missed while the device was off.
    missed: Literal["skip", "run_once"] = "skip"


class StepSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One step: an action with params, run once every step it `needs` is done."""

    name: _Name
    action: str
    params: dict[str, Any] = {}
    needs: list[str] = []
    if_: str | None = msgspec.field(default=None, name="if")
    retry: RetrySpec | None = None
    timeout: _Positive | None = None
    on_error: Literal["fail", "continue"] = "fail"


class WorkflowSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A workflow definition as written, before its expressions are compiled."""

    name: _Name
    version: str = "1"
    description: str = ""
    inputs: dict[str, InputSpec] = {}
    triggers: list[TriggerSpec] = []
    timeout: _Positive | None = None
    # Most runs of this workflow in flight at once; None: no limit of its own.
    concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    steps: Annotated[list[StepSpec], msgspec.Meta(min_length=1)]
    outputs: dict[str, Any] = {}


class WorkflowError(FrysError):
    """Root of the errors about workflows."""


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a definition (or a run's inputs), and where."""

    path: str  # such as "steps[2].retry.max_attempts"; "" for the whole definition
    line: int | None
    message: str

    def format(self, source: str | None = None) -> str:
        """`source:line: path: message`, leaving out the parts that are unknown."""
        place = source or ""
        if self.line is not None:
            place = f"{place}:{self.line}" if place else f"line {self.line}"
        return ": ".join([*(part for part in (place, self.path) if part), self.message])

    def __str__(self) -> str:
        return self.format()


class DefinitionError(WorkflowError):
    """A definition (or a run's inputs) is invalid; `problems` lists every reason."""

    def __init__(
        self,
        problems: list[Problem],
        source: str | None = None,
        subject: str = "invalid workflow definition",
    ) -> None:
        self.problems = problems
        self.source = source
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        listing = "".join(f"\n  {problem.format(source)}" for problem in problems)
        super().__init__(f"{source or subject}: {count}:{listing}")


@dataclass(frozen=True, eq=False)
class Workflow:
    """A validated definition with its expressions compiled: what the engine runs."""

    spec: WorkflowSpec
    order: list[str]  # topological; definition order among steps independent of each other
    steps: dict[str, StepSpec]
    params: dict[str, Any]  # step name -> compiled params
    conditions: dict[str, Template | None]
    outputs: Any
    dependants: dict[str, list[str]]  # step name -> the steps that need it directly

    def to_json(self) -> bytes:
        """The definition as JSON, stored with each run so a resumed run keeps its definition."""
        return msgspec.json.encode(self.spec)

    @classmethod
    def from_json(cls, data: bytes, known_actions: Collection[str]) -> Workflow:
        """Load a definition stored by `to_json`, validating it again."""
        try:
            document = msgspec.json.decode(data)
        except msgspec.DecodeError as error:
            raise WorkflowError(f"stored workflow definition is not valid JSON: {error}") from None
        return parse_workflow(document, known_actions, source="stored definition")


# A problem before it is placed on a line: (path, message).
_Found = list[tuple[str, str]]
# What a reference may name: declared inputs (None: unknown), step names, and the step using it
# with its upstream steps (None in workflow outputs, which may read any step).
_Scope = tuple[list[str] | None, list[str], tuple[str, set[str]] | None]


class _Bad:
    """A value that failed conversion; why is already recorded."""


_BAD = _Bad()


def load_workflow(path: str | os.PathLike[str], known_actions: Collection[str]) -> Workflow:
    """Load and validate a .yaml/.yml, .json or .toml definition; DefinitionError lists all."""
    source = os.fspath(path)
    reader = _READERS.get(os.path.splitext(source)[1].lower())
    if reader is None:
        raise WorkflowError(f"{source}: unknown definition format; use .yaml, .yml, .json or .toml")
    try:
        with open(source, "rb") as file:
            raw = file.read()
    except OSError as error:
        raise WorkflowError(
            f"{source}: cannot read workflow definition: {error.strerror}"
        ) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        problem = Problem("", line, "not UTF-8 text; save the file as UTF-8")
        raise DefinitionError([problem], source) from None
    data, lines = reader(text, source)
    return parse_workflow(data, known_actions, source, lines)


def parse_workflow(
    data: Mapping[str, Any],
    known_actions: Collection[str],
    source: str | None = None,
    lines: Mapping[str, int] | None = None,
) -> Workflow:
    """Convert and validate a definition; DefinitionError lists every problem found."""
    found: _Found = []
    spec: Any = _BAD
    document: object = data  # files can hold anything at the top
    if not isinstance(document, Mapping):
        found.append(("", f"expected a mapping of workflow fields, got {_describe(document)}"))
    else:
        if type(document.get("version")) is int:  # `version: 2` is as good as `version: "2"`
            document = {**document, "version": str(document["version"])}
        spec = _convert(WorkflowSpec, document, "", found)
        _check_references(document, known_actions, found)
    if found:
        problems = [Problem(path, _line_of(path, lines), message) for path, message in found]
        problems.sort(key=lambda problem: problem.line or 0)
        raise DefinitionError(problems, source)
    return _compile(spec)


def coerce_inputs(workflow: Workflow, given: Mapping[str, Any]) -> dict[str, Any]:
    """A run's inputs with defaults applied; DefinitionError lists missing, wrong or extra ones."""
    declared = workflow.spec.inputs
    found: _Found = []
    for name in given:
        if name not in declared:
            found.append((f"inputs.{name}", _unknown("input", name, list(declared))))
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in given:
            values[name] = given[name]
            if not _INPUT_CHECKS[spec.type](given[name]):
                found.append(
                    (f"inputs.{name}", f"expected {spec.type}, got {_describe(given[name])}")
                )
        elif spec.default is not msgspec.UNSET:
            values[name] = spec.default
        else:
            found.append((f"inputs.{name}", "required input is missing"))
    if found:
        problems = [Problem(path, None, message) for path, message in found]
        raise DefinitionError(
            problems, subject=f"invalid inputs for workflow {workflow.spec.name!r}"
        )
    return values


def parse_input_pair(text: str) -> tuple[str, Any]:
    """`key=value` from `--input`: the value as JSON if it parses as JSON, else as a string."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise WorkflowError(f"--input expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def ready_steps(workflow: Workflow, states: Mapping[str, str]) -> list[str]:
    """Pending steps whose needs are all done, in `order`; a missing state means pending."""
    # Plain loops: the engine calls this after every step, so it stays on the hot path.
    ready = []
    steps = workflow.steps
    for name in workflow.order:
        if states.get(name, "pending") != "pending":
            continue
        for need in steps[name].needs:
            if not _done(workflow, need, states):
                break
        else:
            ready.append(name)
    return ready


def run_outcome(workflow: Workflow, states: Mapping[str, str]) -> str | None:
    """The run's final status ("failed", "succeeded" or "cancelled") once it has one, else None."""
    values = states.values()
    if "failed" in values and any(
        states.get(name) == "failed" and step.on_error == "fail"
        for name, step in workflow.steps.items()
    ):
        return "failed"  # its dependants can never run, so the run is over
    # A step with no state is pending, so fewer states than steps cannot be a success.
    if len(states) >= len(workflow.steps) and all(
        _done(workflow, name, states) for name in workflow.steps
    ):
        return "succeeded"
    if "cancelled" in values:
        return "cancelled"
    return None


def _done(workflow: Workflow, name: str, states: Mapping[str, str]) -> bool:
    state = states.get(name, "pending")
    if state == "succeeded" or state == "skipped":
        return True
    return state == "failed" and workflow.steps[name].on_error == "continue"


def _compile(spec: WorkflowSpec) -> Workflow:
    steps = {step.name: step for step in spec.steps}
    needs = {name: step.needs for name, step in steps.items()}
    order, _ = _toposort(list(steps), needs)
    dependants: dict[str, list[str]] = {name: [] for name in steps}
    for name in order:
        for need in dict.fromkeys(steps[name].needs):
            dependants[need].append(name)
    return Workflow(
        spec=spec,
        order=order,
        steps=steps,
        params={name: compile_value(step.params) for name, step in steps.items()},
        conditions={
            name: None if step.if_ is None else compile_condition(step.if_)
            for name, step in steps.items()
        },
        outputs=compile_value(spec.outputs),
        dependants=dependants,
    )


# --- conversion: one msgspec check per field, walking into nested structs ---------------------


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _holds_struct(tp: Any) -> bool:
    return _is_struct(tp) or any(_holds_struct(arg) for arg in get_args(tp))


def _shell(tp: Any) -> Any:
    """tp with each Struct replaced by Any: the container's own shape and bounds."""
    if _is_struct(tp):
        return Any
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return Annotated[(_shell(args[0]), *args[1:])]
    if origin in (Union, UnionType):
        return Union[tuple(_shell(arg) for arg in args)]  # noqa: UP007 (built from a tuple)
    return origin[tuple(_shell(arg) for arg in args)] if args else tp


def _convert(tp: Any, raw: Any, path: str, found: _Found) -> Any:
    """raw as tp, or _BAD once every reason it is not has been added to found."""
    if _is_struct(tp):
        return _convert_struct(tp, raw, path, found)
    if not _holds_struct(tp):
        return _convert_plain(tp, raw, path, found)
    if _convert_plain(_shell(tp), raw, path, found) is _BAD:
        return _BAD
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    origin, args = get_origin(tp), get_args(tp)
    if raw is None:
        return None
    if origin is list:
        items = [_convert(args[0], item, f"{path}[{i}]", found) for i, item in enumerate(raw)]
        return _BAD if _BAD in items else items
    if origin is dict:
        values = {
            key: _convert(args[1], item, _join(path, key), found) for key, item in raw.items()
        }
        return _BAD if _BAD in values.values() else values
    (member,) = (arg for arg in args if arg is not NoneType)  # an optional struct
    return _convert(member, raw, path, found)


def _convert_struct(cls: type[msgspec.Struct], raw: Any, path: str, found: _Found) -> Any:
    if not isinstance(raw, Mapping):
        found.append((path, f"expected a mapping of fields, got {_describe(raw)}"))
        return _BAD
    fields = {field.encode_name: field for field in msgspec.structs.fields(cls)}
    before = len(found)
    values: dict[str, Any] = {}
    for key, item in raw.items():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            found.append((_join(path, key), _unknown("field", str(key), list(fields))))
        else:
            values[field.name] = _convert(field.type, item, _join(path, key), found)
    for key, field in fields.items():
        if field.required and key not in raw:
            found.append((_join(path, key), "required field is missing"))
    if len(found) > before:
        return _BAD
    value = cls(**values)
    check = _STRUCT_CHECKS.get(cls)
    if check is not None:
        found.extend((_join(path, key), message) for key, message in check(value))
    return _BAD if len(found) > before else value


def _convert_plain(tp: Any, raw: Any, path: str, found: _Found) -> Any:
    try:
        return msgspec.convert(raw, tp, strict=True)
    except msgspec.ValidationError as error:
        found.append(_explain(tp, raw, path, str(error)))
        return _BAD


_MSGSPEC_ERROR = re.compile(
    r"Expected `(?P<type>[^`]*)`(?P<bound>.*?)"
    r"(?:, got `(?P<got>[^`]*)`)?(?: - at (?P<key>`key` in )?`\$(?P<at>[^`]*)`)?"
)


def _explain(tp: Any, raw: Any, path: str, error: str) -> tuple[str, str]:
    """msgspec's message as "expected X, got Y" at the most precise path msgspec gives."""
    if get_origin(tp) is Literal:
        choices = ", ".join(map(_show, get_args(tp)))
        return path, f"expected one of {choices}, got {_show(raw)}"
    match = _MSGSPEC_ERROR.fullmatch(error)
    if match is None:
        return path, error[0].lower() + error[1:]
    expected = match["type"] + match["bound"]
    if _NAME_PATTERN in expected:
        expected = "a name of letters, digits, '_' and '-' that starts with a letter or '_'"
    if match["key"]:  # a mapping key, such as `1:` in params
        expected += " keys"
    if match["at"] or match["key"]:  # msgspec names only the type of an inner value
        return path + match["at"], f"expected {expected}, got {match['got']}"
    got = _describe(raw) if match["got"] else _show(raw)
    return path, f"expected {expected}, got {got}"


def _trigger_problems(trigger: TriggerSpec) -> Iterator[tuple[str, str]]:
    for kind, field in (("event", "topic"), ("interval", "every"), ("cron", "cron")):
        given = getattr(trigger, field) is not None
        if kind == trigger.type and not given:
            yield field, f"required for {kind} triggers"
        elif kind != trigger.type and given:
            yield field, f"only {kind} triggers take {field!r}"
    if trigger.topic is not None:
        try:
            validate_pattern(trigger.topic)
        except FrysError as error:
            yield "topic", str(error)
    if trigger.cron is not None:
        if len(trigger.cron.split()) != 5:
            yield "cron", f"expected 5 fields (minute hour day month weekday), got {trigger.cron!r}"
        else:
            try:
                CronSim(trigger.cron, datetime.now(UTC))
            except CronSimError as error:
                yield "cron", f"bad cron expression {trigger.cron!r}: {error}"


def _input_problems(spec: InputSpec) -> Iterator[tuple[str, str]]:
    if spec.default is not msgspec.UNSET and not _INPUT_CHECKS[spec.type](spec.default):
        yield "default", f"expected {spec.type}, got {_describe(spec.default)}"


_STRUCT_CHECKS: dict[type[Any], Callable[[Any], Iterator[tuple[str, str]]]] = {
    TriggerSpec: _trigger_problems,
    InputSpec: _input_problems,
}

_INPUT_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "object": lambda value: isinstance(value, Mapping),
    "array": lambda value: isinstance(value, list),
    "any": lambda value: True,
}


# --- checks across fields: actions, the graph, expressions ------------------------------------
# These read the raw data leniently, so that a bad type elsewhere in a step hides nothing here.


def _check_references(
    data: Mapping[str, Any], known_actions: Collection[str], found: _Found
) -> None:
    raw_steps = data.get("steps")
    steps = [
        (f"steps[{i}]", step)
        for i, step in enumerate(raw_steps if isinstance(raw_steps, list) else [])
        if isinstance(step, Mapping)
    ]
    first: dict[str, tuple[str, list[Any]]] = {}  # step name -> (its path, its raw needs)
    for path, step in steps:
        action, name = step.get("action"), step.get("name")
        if isinstance(action, str) and action not in known_actions:
            found.append((f"{path}.action", _unknown("action", action, sorted(known_actions))))
        if not isinstance(name, str):
            continue
        if name in first:
            found.append((f"{path}.name", f"duplicate step name {name!r} (also {first[name][0]})"))
            continue
        raw_needs = step.get("needs")
        first[name] = path, raw_needs if isinstance(raw_needs, list) else []
    names = list(first)
    needs: dict[str, list[str]] = {}
    for name, (path, raw_needs) in first.items():
        needs[name] = [need for need in raw_needs if isinstance(need, str) and need in first]
        for j, need in enumerate(raw_needs):
            if isinstance(need, str) and need not in first:
                listing = ", ".join(names)
                found.append((f"{path}.needs[{j}]", f"unknown step {need!r} (steps: {listing})"))
    _, rest = _toposort(names, needs)
    for cycle in _cycles(rest, needs):
        path, raw_needs = first[cycle[0]]
        closing = raw_needs.index(cycle[-2])
        found.append((f"{path}.needs[{closing}]", "cycle: " + " -> ".join(cycle)))

    raw_inputs = data.get("inputs")
    inputs = list(raw_inputs) if isinstance(raw_inputs, Mapping) else None
    for path, step in steps:
        name = step.get("name")
        if not isinstance(name, str) or first[name][0] != path:
            continue
        user = name, _upstream(name, needs)
        expressions = [
            (where, text, False)
            for where, text in _expressions(step.get("params"), f"{path}.params")
        ]
        if isinstance(step.get("if"), str):
            expressions.append((f"{path}.if", step["if"], True))
        for where, text, condition in expressions:
            _check_expression(text, condition, where, (inputs, names, user), found)
    for where, text in _expressions(data.get("outputs"), "outputs"):
        _check_expression(text, False, where, (inputs, names, None), found)


def _expressions(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, text) of every string holding an expression, as compile_value finds them."""
    if isinstance(value, str) and "${{" in value:
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _expressions(item, _join(path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _expressions(item, f"{path}[{i}]")


def _check_expression(text: str, condition: bool, path: str, scope: _Scope, found: _Found) -> None:
    try:
        template = compile_condition(text) if condition else compile_template(text)
    except ExpressionError as error:
        found.append((path, f"bad expression: {error}"))
        return
    for ref in template.references():
        problem = _reference_problem(ref, *scope)
        if problem:
            found.append((path, problem))


def _reference_problem(
    ref: Reference,
    inputs: list[str] | None,
    steps: list[str],
    user: tuple[str, set[str]] | None,
) -> str | None:
    """Why ref cannot be resolved, if it cannot."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in ref)[1:]
    root, field = ref[0], ref[1] if len(ref) > 1 else None
    if root == "inputs" and inputs is not None and field is not None and field not in inputs:
        return f"{text}: {_unknown('input', str(field), inputs)}"
    if root == "run" and field not in _RUN_FIELDS:
        return f"{text}: run has only {', '.join(sorted(_RUN_FIELDS))}"
    if root != "steps":
        return None
    if field not in steps:
        return f"{text}: unknown step {field!r} (steps: {', '.join(steps)})"
    if len(ref) < 3 or ref[2] not in _STEP_FIELDS:
        return f"{text}: expected steps.{field}.output or steps.{field}.status"
    if user is not None and field not in user[1]:
        if field == user[0]:
            return f"{text}: a step cannot read its own result"
        return f"{text}: step {field!r} does not run before {user[0]!r}; add it to `needs`"
    return None


def _upstream(name: str, needs: Mapping[str, list[str]]) -> set[str]:
    """Every step that name needs, directly or through others."""
    seen: set[str] = set()
    stack = list(needs.get(name, ()))
    while stack:
        step = stack.pop()
        if step not in seen:
            seen.add(step)
            stack.extend(needs.get(step, ()))
    return seen


def _toposort(names: list[str], needs: Mapping[str, list[str]]) -> tuple[list[str], list[str]]:
    """(order, rest): a stable topological order, and the steps stuck behind a cycle."""
    index = {name: i for i, name in enumerate(names)}
    waiting = {name: len(set(needs[name])) for name in names}
    dependants: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        for need in set(needs[name]):
            dependants[need].append(name)
    ready = [index[name] for name in names if not waiting[name]]
    heapq.heapify(ready)  # the earliest defined ready step goes first
    order: list[str] = []
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for dependant in dependants[name]:
            waiting[dependant] -= 1
            if not waiting[dependant]:
                heapq.heappush(ready, index[dependant])
    placed = set(order)
    return order, [name for name in names if name not in placed]


def _cycles(rest: list[str], needs: Mapping[str, list[str]]) -> Iterator[list[str]]:
    """One cycle per group of steps that wait on each other (the shortest through its earliest
    step), in run order: [a, b, c, a] means b needs a, c needs b and a needs c."""
    covered: set[str] = set()
    for start in rest:
        if start in covered:
            continue
        # Breadth first upstream from start until start itself is reached.
        came_from: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in came_from:
            following = []
            for step in frontier:
                for need in needs[step]:
                    if need not in came_from:
                        came_from[need] = step
                        following.append(need)
            frontier = following
        if start not in came_from:
            continue  # stuck behind a cycle, not in one
        cycle = [start]
        while len(cycle) == 1 or cycle[-1] != start:
            cycle.append(came_from[cycle[-1]])
        # The rest of start's group would only repeat this cycle with other members.
        group = {name for name in rest if start in _upstream(name, needs)}
        covered.update(group & _upstream(start, needs))
        yield cycle


# --- reading files --------------------------------------------------------------------------


# libyaml when PyYAML was built with it; the pure-Python loader otherwise (Pyodide, say).
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        context = f" ({error.context})" if error.context else ""
        message = f"YAML syntax error: {error.problem}{context}"
        line = None if mark is None else mark.line + 1
        if mark is not None:
            message += f" at column {mark.column + 1}"
        raise DefinitionError([Problem("", line, message)], source) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _node_lines(node, "", lines)
    return data, lines


def _node_lines(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            key_path = _join(path, key.value)
            lines.setdefault(key_path, key.start_mark.line + 1)
            _node_lines(value, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, f"{path}[{i}]", lines)


def _read_json(text: str, source: str) -> tuple[Any, dict[str, int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        message = f"JSON syntax error: {error.msg} at column {error.colno}"
        raise DefinitionError([Problem("", error.lineno, message)], source) from None
    return data, _json_lines(text)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


@dataclass
class _JsonFrame:
    path: str
    is_object: bool
    index: int = 0
    expect_key: bool = True
    key_path: str = ""


def _json_lines(text: str) -> dict[str, int]:
    """The line of every key and array item, scanning text that already parsed as JSON."""
    lines: dict[str, int] = {}
    frames: list[_JsonFrame] = []
    line, scanned = 1, 0
    for match in _JSON_TOKEN.finditer(text):
        token = match[0]
        line += text.count("\n", scanned, match.start())
        scanned = match.start()
        frame = frames[-1] if frames else None
        if token == ":":
            continue
        if token == ",":
            if frame is not None and frame.is_object:
                frame.expect_key = True
            elif frame is not None:
                frame.index += 1
            continue
        if token in ("}", "]"):
            frames.pop()
            continue
        if frame is not None and frame.is_object and frame.expect_key:
            frame.key_path = _join(frame.path, json.loads(token))
            frame.expect_key = False
            lines.setdefault(frame.key_path, line)
            continue
        if frame is None:
            path = ""
        else:
            path = frame.key_path if frame.is_object else f"{frame.path}[{frame.index}]"
        lines.setdefault(path, line)
        if token in ("{", "["):
            frames.append(_JsonFrame(path, token == "{"))
    return lines


_TOML_ERROR = re.compile(r"(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)")
_TOML_HEADER = re.compile(r"\s*(\[\[?)\s*([^\[\]]+?)\s*\]")
_TOML_KEY = re.compile(r"\s*([\w\-.\"' ]+?)\s*=")


def _read_toml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # tomllib gives the position only inside its message.
        match = _TOML_ERROR.fullmatch(str(error))
        if match is None:  # "(at end of document)"
            problem = Problem("", text.count("\n") + 1, f"TOML syntax error: {error}")
        else:
            message = f"TOML syntax error: {match['message']} at column {match['column']}"
            problem = Problem("", int(match["line"]), message)
        raise DefinitionError([problem], source) from None
    return data, _toml_lines(text)


def _toml_lines(text: str) -> dict[str, int]:
    """The first line of each table and key: a line scan, good enough to point at a key."""
    lines: dict[str, int] = {}
    tables: dict[str, int] = {}  # array of tables -> index of its latest table
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if header := _TOML_HEADER.match(line):
            parts = [part.strip().strip("\"'") for part in header[2].split(".")]
            table = ""
            for depth, part in enumerate(parts, start=1):
                dotted = ".".join(parts[:depth])
                if depth == len(parts) and header[1] == "[[":
                    tables[dotted] = tables.get(dotted, -1) + 1
                table = _join(table, part)
                if dotted in tables:
                    table += f"[{tables[dotted]}]"
            lines.setdefault(table, number)
        elif key := _TOML_KEY.match(line):
            path = table
            for part in key[1].split("."):
                path = _join(path, part.strip().strip("\"'"))
            lines.setdefault(path, number)
    return lines


_READERS: dict[str, Callable[[str, str], tuple[Any, dict[str, int]]]] = {
    ".yaml": _read_yaml,
    ".yml": _read_yaml,
    ".json": _read_json,
    ".toml": _read_toml,
}


# --- small helpers --------------------------------------------------------------------------


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _line_of(path: str, lines: Mapping[str, int] | None) -> int | None:
    """The line of path, or of its nearest parent that has one."""
    if lines is None:
        return None
    while path not in lines:
        if not path:
            return None
        cut = path.rfind("[") if path.endswith("]") else path.rfind(".")
        path = path[: max(cut, 0)]
    return lines[path]


def _unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(known) or "none"
    return f"unknown {what} {name!r}{hint} (known: {listing})"


def _show(value: object) -> str:
    try:
        shown = msgspec.json.encode(value).decode()
    except TypeError:
        shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


# msgspec's names, so every "got" in a message reads alike
_TYPE_NAMES: list[tuple[type[Any], str]] = [(bool, "bool"), (int, "int"), (float, "float")]
_TYPE_NAMES += [(str, "str"), (Mapping, "object"), (list, "array"), (NoneType, "null")]


def _describe(value: object) -> str:
    kind = next((name for tp, name in _TYPE_NAMES if isinstance(value, tp)), type(value).__name__)
    return f"{kind} {_show(value)}"
