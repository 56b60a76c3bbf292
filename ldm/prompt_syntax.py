"""AUTOMATIC1111's prompt language: attention weights and the prompt-editing grammar.

Two parsers, each reproducing the web UI's ``modules/prompt_parser.py``:

- :func:`parse_prompt_attention` (its ``parse_prompt_attention`` with ``re_attention``
  and ``re_break``): ``(text)`` multiplies the weight by 1.1, ``[text]`` divides it by
  1.1, ``(text:1.5)`` sets a factor, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are
  literal characters, unclosed brackets apply to the end of the text, ``BREAK`` is
  ``("BREAK", -1.0)``, and neighbours of equal weight are merged.
- :func:`parse_editing`: the web UI's ``schedule_parser`` grammar (lark, Earley) for
  ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and ``[a|b|c]``, written as a
  recursive-descent parser. A text the grammar rejects (a ``|`` outside ``[...|...]``,
  a backslash at the end or before a newline) has no editing at all, as there.

  The grammar is ambiguous at the top level, where bracket characters may also be
  plain text: ``" [a:b:2]]]"`` reads as an edit followed by ``"]]"`` or as text.
  lark resolves that by the order of its internal sets, so the web UI's answer
  depends on the lark version and, with the lark 1.1.2 it pins, on Python's hash
  seed (the same prompt edits in one run and not in the next). This parser always
  reads the construct, which is what the web UI does whenever a top-level ``[...]`` is
  not directly followed by one of ``[ ] ( ) :``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
BREAK = "BREAK"
BREAK_WEIGHT = -1.0

# The web UI's re_attention, alternative for alternative.
_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _check_text(text: object, name: str = "prompt") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as ``(piece, weight)`` pairs, exactly as the web UI's parser returns them.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    A ``(...:x)`` whose ``x`` is not a number is text; ``BREAK`` inside brackets gets
    its weight multiplied like any piece (and is then plain text to the encoder, as
    in the web UI, which only splits on weight exactly -1).
    """
    _check_text(text)
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            # float() of re_attention's [.\d]+ fails for "1.2.3" in the web UI too.
            multiply_from(round_open.pop(), _weight(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append([BREAK, BREAK_WEIGHT])
                res.append([part, 1.0])
    # Brackets left open apply to the end, innermost first as the web UI does.
    for start in round_open:
        multiply_from(start, ROUND_FACTOR)
    for start in square_open:
        multiply_from(start, SQUARE_FACTOR)
    if not res:
        res = [["", 1.0]]
    merged: list[list] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(piece, weight) for piece, weight in merged]


def _weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"attention weight {text!r} in '(...:{text})' is not a number") from None


# --- the prompt-editing grammar -------------------------------------------------------


@dataclass(frozen=True)
class Scheduled:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``. ``when`` is the
    number as written (the web UI reads "0.5" as a fraction of the steps, "5" as a step)."""

    before: "Nodes | None"
    after: "Nodes"
    when: str


@dataclass(frozen=True)
class Alternate:
    """``[a|b|c]``: option ``(step - 1) % len(options)`` at each step; None is empty."""

    options: "tuple[Nodes | None, ...]"


Node = Union[str, Scheduled, Alternate]
Nodes = tuple[Node, ...]

# SIGNED_NUMBER of lark's common grammar, with the grammar's optional whitespace and "]".
_NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*\]")
_STOPS = frozenset("[]():|")


class _Rejected(Exception):
    """The text is not in the grammar: the web UI then uses it as it is."""


def parse_editing(text: str) -> Nodes | None:
    """The prompt-editing parse of ``text``: literal strings and :class:`Scheduled` /
    :class:`Alternate` nodes; None when the grammar rejects the text."""
    _check_text(text)
    nodes: list[Node] = []
    i = 0
    try:
        while i < len(text):
            c = text[i]
            if c in "[(":
                parsed = _construct(text, i)
                if parsed is not None:
                    nodes.extend(parsed[0])
                    i = parsed[1]
                    continue
            if c in "[]():":
                # Outside any construct these characters are text (the grammar's
                # top-level /[][():]/+ alternative).
                nodes.append(c)
                i += 1
            elif c == "|":
                raise _Rejected
            else:
                piece, i = _plain(text, i)
                nodes.append(piece)
    except _Rejected:
        return None
    return _joined(nodes)


def _plain(text: str, i: int) -> tuple[str, int]:
    """The longest run of plain text from ``i``: anything but brackets, ':' and '|',
    or a backslash with the character after it (not a newline: lark's '.')."""
    j = i
    while j < len(text) and text[j] not in _STOPS:
        if text[j] == "\\":
            if j + 1 >= len(text) or text[j + 1] == "\n":
                raise _Rejected
            j += 2
        else:
            j += 1
    return text[i:j], j


def _prompt(text: str, i: int) -> tuple[Nodes, int] | None:
    """The grammar's ``prompt`` inside a construct: stops at ']', ')', ':', '|' or the end."""
    nodes: list[Node] = []
    while i < len(text) and text[i] not in "]):|":
        if text[i] in "[(":
            parsed = _construct(text, i)
            if parsed is None:
                return None
            nodes.extend(parsed[0])
            i = parsed[1]
        else:
            piece, i = _plain(text, i)
            nodes.append(piece)
    return _joined(nodes), i


def _construct(text: str, i: int) -> tuple[Nodes, int] | None:
    """A construct opening at ``text[i]`` ('(' or '['): its nodes and the index after it,
    or None when no construct of the grammar starts there."""
    first = _prompt(text, i + 1)
    if first is None:
        return None
    inner, j = first
    closer = text[j] if j < len(text) else ""
    if text[i] == "(":
        # emphasized: "(" prompt ")" | "(" prompt ":" prompt ")"; kept as text.
        if closer == ")":
            return ("(", *inner, ")"), j + 1
        if closer != ":":
            return None
        second = _prompt(text, j + 1)
        if second is None or second[1] >= len(text) or text[second[1]] != ")":
            return None
        return ("(", *inner, ":", *second[0], ")"), second[1] + 1
    if closer == "]":
        return ("[", *inner, "]"), j + 1
    if closer == "|":
        return _alternate(text, inner, j)
    if closer == ":":
        return _scheduled(text, inner, j)
    return None


def _alternate(text: str, first: Nodes, j: int) -> tuple[Nodes, int] | None:
    options: list[Nodes | None] = [first]
    while j < len(text) and text[j] == "|":
        parsed = _prompt(text, j + 1)
        if parsed is None:
            return None
        options.append(parsed[0] or None)
        j = parsed[1]
    if j >= len(text) or text[j] != "]":
        return None
    return (Alternate(tuple(options)),), j + 1


def _scheduled(text: str, first: Nodes, j: int) -> tuple[Nodes, int] | None:
    """``[first:when]`` or ``[first:second:when]``, ``j`` at the first ':'."""
    number = _NUMBER.match(text, j + 1)
    if number is not None:
        return (Scheduled(None, first, number.group(1)),), number.end()
    second = _prompt(text, j + 1)
    if second is None:
        return None
    after, k = second
    if k >= len(text) or text[k] != ":":
        return None
    number = _NUMBER.match(text, k + 1)
    if number is None:
        return None
    return (Scheduled(first, after, number.group(1)),), number.end()


def _joined(nodes: list[Node]) -> Nodes:
    """Adjacent strings merged: equal texts compare equal whatever the split."""
    out: list[Node] = []
    for node in nodes:
        if isinstance(node, str) and out and isinstance(out[-1], str):
            out[-1] += node
        elif not (isinstance(node, str) and not node):
            out.append(node)
    return tuple(out)


def has_editing(nodes: Nodes | None) -> bool:
    """True when a parse holds prompt editing or alternation (its text depends on the step)."""
    return nodes is not None and any(not isinstance(n, str) for n in nodes)


__all__ = [
    "Alternate",
    "BREAK",
    "BREAK_WEIGHT",
    "Scheduled",
    "has_editing",
    "parse_editing",
    "parse_prompt_attention",
]
