"""Expressions: owns the `${{ ... }}` language of workflow definitions, parsed once and rendered
per run, and must never evaluate Python, touch object attributes, call anything or do I/O.

Grammar::

    expr      := or
    or        := and (("||" | "or") and)*
    and       := not (("&&" | "and") not)*
    not       := ("!" | "not") not | compare
    compare   := primary (("==" | "!=" | "<" | "<=" | ">" | ">=") primary)?
    primary   := NUMBER | STRING | "true" | "false" | "null" | reference | "(" expr ")"
    reference := ROOT ("." NAME | "[" (INT | STRING) "]")*     ROOT in {inputs, steps, run}
    NAME      := [A-Za-z_][A-Za-z0-9_-]*                        (step names may contain '-')
    STRING    := '...' or "..." with backslash escapes \\ \' \" only
    NUMBER    := -?digits[.digits][(e|E)[+-]digits]
    INT       := -?digits                                       (negative counts from the end)

Semantics: `or`/`and`/`not` use truthiness (null, 0, "", empty containers are false), short-circuit
and return booleans. `==`/`!=` compare any values, but a boolean never equals a number (at any
depth). `<`, `<=`, `>`, `>=` need two numbers or two strings. A reference walks the render
context (keys `inputs`, `steps`, `run`) by mapping key or list index.

A template whose whole text (ignoring surrounding whitespace) is one `${{ expr }}` renders to the
value itself; otherwise each value is interpolated as text: null as "", booleans as
"true"/"false", dicts and lists as compact JSON.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any, NamedTuple, TypeAlias

from frys_edge.core import FrysError

Reference: TypeAlias = tuple[str | int, ...]
_Evaluate: TypeAlias = Callable[[Mapping[str, Any]], Any]

_ROOTS = ("inputs", "steps", "run")
_LITERALS = {"true": True, "false": False, "null": None}
_OPERATOR_WORDS = ("and", "or", "not")
_ORDERINGS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_COMPARISONS = ("==", "!=", *_ORDERINGS)
_MAX_LISTED_KEYS = 20  # keeps "no key" messages readable for huge step outputs

_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
# Matches optional whitespace then at most one token; no token means end of text or a bad char.
_TOKEN = re.compile(
    rf"""\s*(?:
        (?P<number>-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
      | (?P<name>{_NAME})
      | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>\|\||&&|==|!=|<=|>=|}}}}|[!<>()\[\].])
    )?""",
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_IS_NAME = re.compile(_NAME)


class ExpressionError(FrysError):
    """An expression failed to parse or evaluate; `column` is a 0-based offset into its text."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


def _error(source: str, what: str, column: int) -> ExpressionError:
    return ExpressionError(f'expression "{source}": {what} at column {column}', column)


class _Token(NamedTuple):
    kind: str  # number, name, string, op or end
    value: Any
    start: int
    end: int


def _tokenize(source: str, pos: int, opened_at: int | None) -> tuple[list[_Token], int]:
    """Tokens from `pos` up to the closing `}}` (or the end of a bare expression), and the offset
    just past it; `opened_at` is where the `${{` began, None for a bare expression."""
    tokens: list[_Token] = []
    while True:
        match = _TOKEN.match(source, pos)
        assert match is not None  # every part of _TOKEN is optional
        kind, pos = match.lastgroup, match.end()
        if kind is None:
            if pos < len(source) and source[pos] in "'\"":
                raise _error(source, "unterminated string", pos)
            if pos < len(source):
                raise _error(source, f"unexpected character {source[pos]!r}", pos)
            if opened_at is not None:
                raise _error(source, 'unterminated "${{" (missing "}}")', opened_at)
            tokens.append(_Token("end", None, pos, pos))
            return tokens, pos
        start, text = match.start(kind), match.group(kind)
        if kind == "op" and text == "}}" and opened_at is not None:
            tokens.append(_Token("end", text, start, pos))
            return tokens, pos
        if kind == "number":
            value: Any = float(text) if any(c in text for c in ".eE") else int(text)
        elif kind == "string":
            value = _unescape(source, text, start)
        else:
            value = text
        tokens.append(_Token(kind, value, start, pos))


def _unescape(source: str, literal: str, start: int) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(1) not in "\\'\"":
            what = (
                f'unknown escape "{match.group()}" in string; only \\\\, \\\' and \\" are escapes'
            )
            raise _error(source, what, start + 1 + match.start())
        return match.group(1)

    return _ESCAPE.sub(replace, literal[1:-1])


class _Parser:
    """Recursive descent over one expression's tokens, producing a tree of closures."""

    def __init__(self, source: str, tokens: list[_Token]) -> None:
        self.source = source
        self.tokens = tokens
        self.index = 0
        self.references: list[Reference] = []

    def parse(self, opened_at: int) -> _Evaluate:
        if self.tokens[0].kind == "end":
            raise _error(self.source, "empty expression", opened_at)
        evaluate = self.parse_or()
        token = self.tokens[self.index]
        if token.kind != "end":
            raise _error(self.source, f"unexpected {self.describe(token)}", token.start)
        return evaluate

    def take(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def accept(self, *words: str) -> _Token | None:
        token = self.tokens[self.index]
        if token.kind in ("op", "name") and token.value in words:
            self.index += 1
            return token
        return None

    def expect(self, word: str) -> None:
        if self.accept(word) is None:
            token = self.tokens[self.index]
            raise _error(
                self.source, f"expected {word!r}, found {self.describe(token)}", token.start
            )

    def describe(self, token: _Token) -> str:
        if token.kind == "end":
            return "end of expression"
        return repr(self.source[token.start : token.end])

    def parse_or(self) -> _Evaluate:
        left = self.parse_and()
        while self.accept("||", "or"):
            left = _either(left, self.parse_and())
        return left

    def parse_and(self) -> _Evaluate:
        left = self.parse_not()
        while self.accept("&&", "and"):
            left = _both(left, self.parse_not())
        return left

    def parse_not(self) -> _Evaluate:
        if self.accept("!", "not"):
            return _negate(self.parse_not())
        return self.parse_compare()

    def parse_compare(self) -> _Evaluate:
        left = self.parse_primary()
        token = self.accept(*_COMPARISONS)
        if token is None:
            return left
        return _compare(token.value, left, self.parse_primary(), self.source, token.start)

    def parse_primary(self) -> _Evaluate:
        token = self.take()
        if token.kind in ("number", "string"):
            return _constant(token.value)
        if token.kind == "op" and token.value == "(":
            inner = self.parse_or()
            self.expect(")")
            return inner
        if token.kind == "name" and token.value in _LITERALS:
            return _constant(_LITERALS[token.value])
        if token.kind == "name" and token.value in _ROOTS:
            return self.parse_reference(token)
        if token.kind == "name" and token.value not in _OPERATOR_WORDS:
            what = f"unknown name {token.value!r}; expressions start with inputs, steps or run"
            raise _error(self.source, what, token.start)
        raise _error(self.source, f"expected a value, found {self.describe(token)}", token.start)

    def parse_reference(self, root: _Token) -> _Evaluate:
        path: list[str | int] = [root.value]
        while True:
            if self.accept("."):
                token = self.take()
                if token.kind != "name":
                    what = f"expected a name after '.', found {self.describe(token)}"
                    raise _error(self.source, what, token.start)
            elif self.accept("["):
                token = self.take()
                if token.kind != "string" and not isinstance(token.value, int):
                    what = (
                        f"expected an integer or a quoted key in [], found {self.describe(token)}"
                    )
                    raise _error(self.source, what, token.start)
                self.expect("]")
            else:
                break
            path.append(token.value)
        reference = tuple(path)
        self.references.append(reference)
        return _lookup(reference, self.source, root.start)


def _constant(value: Any) -> _Evaluate:
    return lambda context: value


def _either(left: _Evaluate, right: _Evaluate) -> _Evaluate:
    return lambda context: bool(left(context)) or bool(right(context))


def _both(left: _Evaluate, right: _Evaluate) -> _Evaluate:
    return lambda context: bool(left(context)) and bool(right(context))


def _negate(operand: _Evaluate) -> _Evaluate:
    return lambda context: not operand(context)


def _compare(symbol: str, left: _Evaluate, right: _Evaluate, source: str, column: int) -> _Evaluate:
    if symbol == "==":
        return lambda context: _equal(left(context), right(context))
    if symbol == "!=":
        return lambda context: not _equal(left(context), right(context))
    order = _ORDERINGS[symbol]

    def evaluate(context: Mapping[str, Any]) -> bool:
        a, b = left(context), right(context)
        if (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str)):
            return bool(order(a, b))
        what = f"cannot compare {_type_name(a)} with {_type_name(b)} using {symbol}"
        raise _error(source, what, column)

    return evaluate


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(a: Any, b: Any) -> bool:
    # Python says True == 1; workflow authors comparing a flag to a count mean a mistake.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[key], b[key]) for key in a)
    return bool(a == b)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _lookup(reference: Reference, source: str, column: int) -> _Evaluate:
    def evaluate(context: Mapping[str, Any]) -> Any:
        value: Any = context
        for key in reference:
            if isinstance(value, Mapping) and key in value:
                value = value[key]
                continue
            if (
                isinstance(value, list | tuple)
                and type(key) is int
                and -len(value) <= key < len(value)
            ):
                value = value[key]
                continue
            raise _error(source, _lookup_failure(reference, value, key), column)
        return value

    return evaluate


def _lookup_failure(reference: Reference, value: Any, key: str | int) -> str:
    where = _format_reference(reference)
    if isinstance(value, Mapping):
        keys = [str(k) for k in islice(value, _MAX_LISTED_KEYS)]
        more = ", ..." if len(value) > _MAX_LISTED_KEYS else ""
        has = f"has: {', '.join(keys)}{more}" if keys else "has no keys"
        return f"{where}: no key {_quote(key)} ({has})"
    if isinstance(value, list | tuple) and isinstance(key, int):
        return f"{where}: no index {key} (has {len(value)} items)"
    return f"{where}: cannot look up {_quote(key)} in {_type_name(value)}"


def _format_reference(reference: Reference) -> str:
    text = str(reference[0])
    for key in reference[1:]:
        is_name = isinstance(key, str) and _IS_NAME.fullmatch(key)
        text += f".{key}" if is_name else f"[{_quote(key)}]"
    return text


def _quote(key: str | int) -> str:
    """The key as it would be written in an expression."""
    if isinstance(key, int):
        return str(key)
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple):
        # default=str: a nested non-JSON value (a datetime, say) still renders instead of failing.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return str(value)


class Template:
    """A string with `${{ ... }}` expressions, parsed once and rendered per run.

    Build one with `compile_template` or `compile_condition`."""

    __slots__ = ("_parts", "_references", "_whole", "text")

    def __init__(
        self, text: str, parts: list[str | _Evaluate], references: list[Reference]
    ) -> None:
        self.text = text
        self._parts = tuple(parts)
        self._references = references
        expressions = [part for part in parts if not isinstance(part, str)]
        only_space = all(not part.strip() for part in parts if isinstance(part, str))
        self._whole = expressions[0] if len(expressions) == 1 and only_space else None

    @property
    def is_static(self) -> bool:
        """True when the text holds no expression, so rendering returns it unchanged."""
        return all(isinstance(part, str) for part in self._parts)

    def references(self) -> list[Reference]:
        """Every reference in the template, in order of appearance."""
        return list(self._references)

    def render(self, context: Mapping[str, Any]) -> Any:
        """The value of a whole-text expression, else the text with each expression filled in."""
        if self._whole is not None:
            return self._whole(context)
        return "".join(
            part if isinstance(part, str) else _to_text(part(context)) for part in self._parts
        )

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def compile_template(text: str) -> Template:
    """Parse every `${{ ... }}` in `text`; raises ExpressionError on a syntax error."""
    parts: list[str | _Evaluate] = []
    references: list[Reference] = []
    pos = 0
    while (opened := text.find("${{", pos)) != -1:
        if opened > pos:
            parts.append(text[pos:opened])
        tokens, pos = _tokenize(text, opened + 3, opened)
        parser = _Parser(text, tokens)
        parts.append(parser.parse(opened))
        references += parser.references
    if pos < len(text):
        parts.append(text[pos:])
    return Template(text, parts, references)


def compile_condition(text: str) -> Template:
    """Parse an `if:` condition: one whole `${{ expr }}`, or a bare expression."""
    if "${{" not in text:
        tokens, _ = _tokenize(text, 0, None)
        parser = _Parser(text, tokens)
        return Template(text, [parser.parse(0)], parser.references)
    template = compile_template(text)
    if template._whole is None:
        # Text around the expression would make it a non-empty string, so always true.
        raise ExpressionError(
            f'condition "{text}" must be a single "${{{{ ... }}}}" with nothing around it'
        )
    return template


def evaluate_condition(template: Template, context: Mapping[str, Any]) -> bool:
    """Whether a compiled condition holds: the truthiness of its value."""
    return bool(template.render(context))


def compile_value(value: Any) -> Any:
    """Copy of a dict/list structure with every string holding `${{` compiled to a Template."""
    if isinstance(value, str):
        return compile_template(value) if "${{" in value else value
    if isinstance(value, dict):
        return {key: compile_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [compile_value(item) for item in value]
    return value


def render_value(compiled: Any, context: Mapping[str, Any]) -> Any:
    """Copy of a `compile_value` result with every Template rendered against `context`."""
    if isinstance(compiled, Template):
        return compiled.render(context)
    if isinstance(compiled, dict):
        return {key: render_value(item, context) for key, item in compiled.items()}
    if isinstance(compiled, list):
        return [render_value(item, context) for item in compiled]
    return compiled


def value_references(compiled: Any) -> list[Reference]:
    """Every reference in every Template of a `compile_value` result, in order."""
    if isinstance(compiled, Template):
        return compiled.references()
    if isinstance(compiled, dict):
        compiled = list(compiled.values())
    if isinstance(compiled, list):
        return [reference for item in compiled for reference in value_references(item)]
    return []
