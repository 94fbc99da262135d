"""Behaviour of the `${{ ... }}` language: parsing, rendering, errors, compiled values."""

from __future__ import annotations

import operator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frys_edge.core import FrysError
from frys_edge.expr import (
    ExpressionError,
    Template,
    compile_condition,
    compile_template,
    compile_value,
    evaluate_condition,
    render_value,
    value_references,
)

CONTEXT: dict[str, Any] = {
    "inputs": {"sensor": "s1", "threshold": 20, "muted": False, "none": None, "ratio": 0.5},
    "steps": {
        "read": {"output": {"value": 21.5, "unit": "C"}},
        "read-2": {"output": {"items": [10, 20, 30], "key with space": "yes", "empty": {}}},
    },
    "run": {"id": "run-1"},
}


def render(text: str, context: dict[str, Any] = CONTEXT) -> Any:
    return compile_template(text).render(context)


def error_of(text: str) -> ExpressionError:
    with pytest.raises(ExpressionError) as excinfo:
        render(text)
    return excinfo.value


# Interpolation and native types


def test_text_with_expressions_is_interpolated() -> None:
    text = (
        "reading ${{ inputs.sensor }} is ${{ steps.read.output.value }}${{steps.read.output.unit}}"
    )
    assert render(text) == "reading s1 is 21.5C"


def test_whole_string_expression_keeps_its_type() -> None:
    assert render("${{ inputs.threshold }}") == 20
    assert render("  ${{ steps.read-2.output.items }}\n") == [10, 20, 30]
    assert render("${{ steps.read.output }}") == {"value": 21.5, "unit": "C"}
    assert render("${{ inputs.none }}") is None
    assert render("${{ inputs.muted }}") is False


def test_interpolated_values_are_written_as_text() -> None:
    text = (
        "[${{ inputs.none }}|${{ inputs.muted }}|${{ true }}|${{ 1.5 }}|${{ steps.read.output }}]"
    )
    assert render(text) == '[|false|true|1.5|{"value":21.5,"unit":"C"}]'
    assert render("x ${{ steps.read-2.output.items }}") == "x [10,20,30]"


def test_text_without_expressions_is_static() -> None:
    template = compile_template("plain $ {{ text }} $x")
    assert template.is_static
    assert template.render({}) == "plain $ {{ text }} $x"
    assert template.references() == []
    assert not compile_template("${{ 1 }}").is_static


def test_dollar_before_an_expression_is_not_an_escape() -> None:
    assert render("$${{ inputs.threshold }}") == "$20"


def test_closing_braces_inside_a_string_do_not_end_the_expression() -> None:
    assert render("${{ 'a }} ${{ b' }}") == "a }} ${{ b"


def test_template_exposes_its_text_and_references_in_order() -> None:
    template = compile_template("${{ run.id }} ${{ steps.a.output.x > inputs.y || inputs.z }}")
    assert template.text == "${{ run.id }} ${{ steps.a.output.x > inputs.y || inputs.z }}"
    assert template.references() == [
        ("run", "id"),
        ("steps", "a", "output", "x"),
        ("inputs", "y"),
        ("inputs", "z"),
    ]
    assert isinstance(template, Template)


# Literals


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("42", 42),
        ("-7", -7),
        ("2.5", 2.5),
        ("1e3", 1000.0),
        ("-1.5E-2", -0.015),
        ("true", True),
        ("false", False),
        ("null", None),
        ("'single'", "single"),
        ('"double"', "double"),
        ("''", ""),
    ],
)
def test_literals_have_their_natural_type(source: str, value: Any) -> None:
    result = render("${{ " + source + " }}")
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        (r"'it\'s'", "it's"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'back\\slash'", "back\\slash"),
        (r"'mixed \" quote'", 'mixed " quote'),
        ("'line\nbreak'", "line\nbreak"),
    ],
)
def test_string_escapes_cover_quotes_and_backslash(literal: str, value: str) -> None:
    assert render("${{ " + literal + " }}") == value


def test_unknown_string_escape_is_an_error() -> None:
    error = error_of(r"${{ 'a\nb' }}")
    assert 'unknown escape "\\n"' in str(error)
    assert error.column == 6


# Operators


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("steps.read.output.value > inputs.threshold", True),
        ("steps.read.output.value >= 21.5", True),
        ("steps.read.output.value < 21.5", False),
        ("steps.read.output.value <= 21.5", True),
        ("inputs.sensor == 's1'", True),
        ("inputs.sensor != 's1'", False),
        ("'abc' < 'abd'", True),
        ("1 == 1.0", True),
        ("inputs.none == null", True),
        ("steps.read-2.output.items == steps.read-2.output.items", True),
        ("steps.read.output == steps.read-2.output", False),
        ("'1' == 1", False),
    ],
)
def test_comparisons(source: str, value: bool) -> None:
    assert render("${{ " + source + " }}") is value


@pytest.mark.parametrize("source", ["true == 1", "false == 0", "1 == true", "0.0 == false"])
def test_a_boolean_never_equals_a_number(source: str) -> None:
    assert render("${{ " + source + " }}") is False
    assert render("${{ " + source.replace("==", "!=") + " }}") is True


def test_a_boolean_never_equals_a_number_inside_lists_and_dicts() -> None:
    context = {"inputs": {"flags": [True, {"on": False}], "counts": [1, {"on": 0}]}}
    assert render("${{ inputs.flags == inputs.counts }}", context) is False
    assert render("${{ inputs.flags == inputs.flags }}", context) is True


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("inputs.sensor < 3", "cannot compare str with int using <"),
        ("true > 0", "cannot compare bool with int using >"),
        ("inputs.none >= 1", "cannot compare null with int using >="),
        ("steps.read-2.output.items <= 1.5", "cannot compare list with float using <="),
    ],
)
def test_ordering_needs_two_numbers_or_two_strings(source: str, message: str) -> None:
    error = error_of("${{ " + source + " }}")
    assert message in str(error)
    assert error.column == 4 + source.index(message.split()[-1])


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("true && false", False),
        ("true and true", True),
        ("false || true", True),
        ("false or false", False),
        ("!true", False),
        ("not false", True),
        ("!!inputs.threshold", True),
        ("not not not true", False),
        ("true || false && false", True),
        ("(true || false) && false", False),
        ("false && false || true", True),
        ("false && (false || true)", False),
        ("not true or true", True),
        ("!(true && false)", True),
        ("not 1 == 2", True),
        ("steps.read.output.value > inputs.threshold && !inputs.muted", True),
    ],
)
def test_logic_operators_and_precedence(source: str, value: bool) -> None:
    assert render("${{ " + source + " }}") is value


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("inputs.none || ''", False),
        ("0 || 0.0", False),
        ("steps.read-2.output.empty or 'x'", True),
        ("'x' && 3", True),
    ],
)
def test_logic_uses_truthiness_and_returns_booleans(source: str, value: bool) -> None:
    assert render("${{ " + source + " }}") is value


def test_logic_short_circuits_past_a_failing_operand() -> None:
    assert render("${{ true || inputs.missing }}") is True
    assert render("${{ false && inputs.missing }}") is False
    with pytest.raises(ExpressionError, match="no key"):
        render("${{ false || inputs.missing }}")


# References


def test_list_indexes_and_quoted_keys() -> None:
    assert render("${{ steps.read-2.output.items[0] }}") == 10
    assert render("${{ steps.read-2.output.items[-1] }}") == 30
    assert render("${{ steps.read-2.output['key with space'] }}") == "yes"
    assert render('${{ steps["read-2"].output.items[1] }}') == 20
    template = compile_template("${{ steps.a.output['x y'][2].z }}")
    assert template.references() == [("steps", "a", "output", "x y", 2, "z")]


def test_keywords_can_be_keys_after_a_dot() -> None:
    assert render("${{ inputs.not }}", {"inputs": {"not": 1}}) == 1


def test_missing_key_lists_the_available_keys() -> None:
    error = error_of("${{ steps.read.output.vlaue }}")
    assert 'steps.read.output.vlaue: no key "vlaue" (has: value, unit)' in str(error)
    assert error.column == 4


def test_missing_step_names_the_full_reference() -> None:
    error = error_of("x ${{ steps.reed.output.value }}")
    assert 'steps.reed.output.value: no key "reed" (has: read, read-2)' in str(error)
    assert error.column == 6


def test_missing_key_in_an_empty_mapping_says_so() -> None:
    error = error_of("${{ steps.read-2.output.empty.x }}")
    assert 'no key "x" (has no keys)' in str(error)


def test_missing_key_message_lists_a_bounded_number_of_keys() -> None:
    context = {"inputs": {f"k{i}": i for i in range(100)}}
    with pytest.raises(ExpressionError) as excinfo:
        render("${{ inputs.nope }}", context)
    assert "k19, ..." in str(excinfo.value)
    assert "k20" not in str(excinfo.value)


def test_index_out_of_range_names_the_length() -> None:
    error = error_of("${{ steps.read-2.output.items[3] }}")
    assert "steps.read-2.output.items[3]: no index 3 (has 3 items)" in str(error)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("steps.read.output.unit.x", 'steps.read.output.unit.x: cannot look up "x" in str'),
        ("steps.read.output.unit[0]", "cannot look up 0 in str"),
        ("inputs.none.x", 'cannot look up "x" in null'),
        ("steps.read-2.output.items.first", 'cannot look up "first" in list'),
        ("inputs.threshold['a b']", 'inputs.threshold["a b"]: cannot look up "a b" in int'),
    ],
)
def test_looking_into_a_non_container_names_its_type(source: str, message: str) -> None:
    assert message in str(error_of("${{ " + source + " }}"))


# Syntax errors


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ("abc ${{ inputs.x", 'unterminated "${{" (missing "}}")', 4),
        ("${{ inputs.x }", "unexpected character '}'", 13),
        ("${{ steps.a.output.x > }}", "expected a value, found end of expression", 23),
        ("${{ inputs.a && }}", "expected a value, found end of expression", 16),
        ("${{ || inputs.a }}", "expected a value, found '||'", 4),
        ("${{ inputs.a = 1 }}", "unexpected character '='", 13),
        ("${{ inputs.a # 1 }}", "unexpected character '#'", 13),
        ("${{ input.a }}", "unknown name 'input'; expressions start with inputs, steps or run", 4),
        ("${{ }}", "empty expression", 0),
        ("x ${{}}", "empty expression", 2),
        ("${{ 'abc }}", "unterminated string", 4),
        ("${{ (inputs.a }}", "expected ')', found end of expression", 14),
        ("${{ inputs.a inputs.b }}", "unexpected 'inputs'", 13),
        ("${{ 1 < 2 < 3 }}", "unexpected '<'", 10),
        ("${{ inputs. }}", "expected a name after '.', found end of expression", 12),
        ("${{ inputs.items[1.5] }}", "expected an integer or a quoted key in [], found '1.5'", 17),
        ("${{ inputs.items[0 }}", "expected ']', found end of expression", 19),
        ("${{ inputs.a and or }}", "expected a value, found 'or'", 17),
    ],
)
def test_syntax_errors_name_the_problem_and_column(text: str, message: str, column: int) -> None:
    with pytest.raises(ExpressionError) as excinfo:
        compile_template(text)
    assert str(excinfo.value) == f'expression "{text}": {message} at column {column}'
    assert excinfo.value.column == column


def test_expression_error_is_a_frys_error() -> None:
    assert issubclass(ExpressionError, FrysError)


# Conditions


@pytest.mark.parametrize(
    "text",
    [
        "${{ steps.read.output.value > inputs.threshold && !inputs.muted }}",
        "steps.read.output.value > inputs.threshold && !inputs.muted",
        "  ${{ steps.read.output.value > inputs.threshold and not inputs.muted }}  ",
    ],
)
def test_condition_accepts_wrapped_or_bare_expressions(text: str) -> None:
    condition = compile_condition(text)
    assert evaluate_condition(condition, CONTEXT) is True
    assert condition.references()[0] == ("steps", "read", "output", "value")


def test_condition_uses_truthiness_of_its_value() -> None:
    assert evaluate_condition(compile_condition("inputs.sensor"), CONTEXT) is True
    assert evaluate_condition(compile_condition("inputs.none"), CONTEXT) is False
    assert evaluate_condition(compile_condition("steps.read-2.output.empty"), CONTEXT) is False


def test_bare_condition_errors_point_into_the_bare_text() -> None:
    with pytest.raises(ExpressionError) as excinfo:
        compile_condition("inputs.a >")
    assert str(excinfo.value) == (
        'expression "inputs.a >": expected a value, found end of expression at column 10'
    )
    with pytest.raises(ExpressionError, match="empty expression"):
        compile_condition("  ")


def test_condition_with_text_around_the_expression_is_rejected() -> None:
    with pytest.raises(ExpressionError, match="must be a single"):
        compile_condition("is ${{ inputs.muted }}")


# Compiled values


def test_compile_value_compiles_only_strings_with_expressions() -> None:
    params = {
        "topic": "sensors/${{ inputs.sensor }}",
        "qos": 1,
        "static": "no expressions",
        "nested": {"values": ["${{ steps.read.output.value }}", "${{ run.id }}", None, True]},
    }
    compiled = compile_value(params)
    assert isinstance(compiled["topic"], Template)
    assert compiled["static"] == "no expressions"
    assert isinstance(compiled["nested"]["values"][0], Template)
    assert compiled["nested"]["values"][2:] == [None, True]
    assert render_value(compiled, CONTEXT) == {
        "topic": "sensors/s1",
        "qos": 1,
        "static": "no expressions",
        "nested": {"values": [21.5, "run-1", None, True]},
    }
    assert value_references(compiled) == [
        ("inputs", "sensor"),
        ("steps", "read", "output", "value"),
        ("run", "id"),
    ]


def test_compile_value_reports_syntax_errors_up_front() -> None:
    with pytest.raises(ExpressionError, match="unknown name 'input'"):
        compile_value({"a": ["${{ input.x }}"]})


def test_compiled_values_render_again_for_each_run() -> None:
    compiled = compile_value({"id": "${{ run.id }}"})
    assert render_value(compiled, {"run": {"id": "a"}}) == {"id": "a"}
    assert render_value(compiled, {"run": {"id": "b"}}) == {"id": "b"}
    assert value_references("plain") == []


# Properties

COMPARISONS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@given(st.integers(), st.integers(), st.sampled_from(sorted(COMPARISONS)))
def test_integer_comparisons_match_python(a: int, b: int, symbol: str) -> None:
    template = compile_template("${{ inputs.a " + symbol + " inputs.b }}")
    assert template.render({"inputs": {"a": a, "b": b}}) is COMPARISONS[symbol](a, b)


@given(st.text())
def test_any_string_round_trips_through_a_quoted_literal(text: str) -> None:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    assert compile_template("${{ '" + escaped + "' }}").render({}) == text


Formula = tuple[Any, ...]  # ("lit", bool) | ("not", f) | ("and", f, f) | ("or", f, f)
PRECEDENCE = {"or": 1, "and": 2, "not": 3, "lit": 4}
SPELLINGS = {"and": ["&&", "and"], "or": ["||", "or"], "not": ["!", "not "]}

formulas: st.SearchStrategy[Formula] = st.recursive(
    st.booleans().map(lambda value: ("lit", value)),
    lambda children: st.one_of(
        children.map(lambda f: ("not", f)),
        st.tuples(st.sampled_from(["and", "or"]), children, children),
    ),
    max_leaves=12,
)


def truth(formula: Formula) -> bool:
    kind = formula[0]
    if kind == "lit":
        return bool(formula[1])
    if kind == "not":
        return not truth(formula[1])
    if kind == "and":
        return truth(formula[1]) and truth(formula[2])
    return truth(formula[1]) or truth(formula[2])


def spell(formula: Formula, draw: st.DrawFn) -> str:
    """Source text with parentheses only where precedence needs them, or where drawn at random."""
    kind = formula[0]
    if kind == "lit":
        return "true" if formula[1] else "false"

    def operand(child: Formula) -> str:
        text = spell(child, draw)
        needed = PRECEDENCE[child[0]] < PRECEDENCE[kind]
        return f"({text})" if needed or draw(st.booleans()) else text

    symbol = draw(st.sampled_from(SPELLINGS[kind]))
    if kind == "not":
        return symbol + operand(formula[1])
    return f"{operand(formula[1])} {symbol} {operand(formula[2])}"


@st.composite
def spelled_formulas(draw: st.DrawFn) -> tuple[str, bool]:
    formula = draw(formulas)
    return spell(formula, draw), truth(formula)


@given(spelled_formulas())
def test_boolean_formulas_evaluate_like_python(case: tuple[str, bool]) -> None:
    source, expected = case
    assert render("${{ " + source + " }}") is expected
    assert evaluate_condition(compile_condition(source), {}) is expected
