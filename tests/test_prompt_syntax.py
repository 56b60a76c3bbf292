"""AUTOMATIC1111's prompt language: the attention parser and the prompt-editing schedule.

Expected values are the docstring examples of the web UI's modules/prompt_parser.py
(``parse_prompt_attention`` and ``get_learned_conditioning_prompt_schedules``) and the
schedule in that file's header comment, written out here as data.
"""

from __future__ import annotations

import pytest

from ldm.prompt_schedule import prompt_schedule, texts_at_steps
from ldm.prompt_syntax import has_editing, parse_editing
from ldm.prompts import parse_prompt_attention

# parse_prompt_attention's docstring.
ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

# get_learned_conditioning_prompt_schedules' docstring, 10 steps, no hires fix.
SCHEDULES = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"],
                     [7, "a"], [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                     [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
]


@pytest.mark.parametrize("text,expected", ATTENTION)
def test_attention_matches_the_web_ui_docstring(text, expected):
    assert parse_prompt_attention(text) == expected


def test_attention_break_weights_and_escapes():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    # Two in a row: an empty piece between them (re_break splits "a BREAK BREAK b" in three).
    assert parse_prompt_attention("a BREAK BREAK b") == [
        ("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    # Inside brackets the marker's weight is multiplied too (and it is then text).
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    # Only a whole word: "BREAKfast" is text.
    assert parse_prompt_attention("BREAKfast") == [("BREAKfast", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("[a]") == [("a", 1 / 1.1)]
    assert parse_prompt_attention("(a:0.5) b") == [("a", 0.5), (" b", 1.0)]
    assert parse_prompt_attention("( a : 1.5 )") == [(" a ", 1.5)]  # spaces around the number
    assert parse_prompt_attention("(a:b)") == [("a:b", 1.1)]  # not a number: text
    assert parse_prompt_attention("a \\\\ b") == [("a \\ b", 1.0)]
    assert parse_prompt_attention("a)b]") == [("a)b]", 1.0)]  # closers without openers
    # Equal weights merge even when they came from different brackets.
    assert parse_prompt_attention("(a)(b:1.1)") == [("ab", 1.1)]


def test_attention_validation():
    with pytest.raises(TypeError, match="str"):
        parse_prompt_attention(None)
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")  # the web UI's float() fails on it too


@pytest.mark.parametrize("prompt,expected", SCHEDULES)
def test_schedule_matches_the_web_ui_docstring(prompt, expected):
    assert prompt_schedule(prompt, 10) == [tuple(e) for e in expected]


def test_schedule_of_a_docstring_case_the_web_ui_marks_unhandled():
    # Its docstring expects [[5, 'a  c'], [10, 'a {b|d{ c']] under "not handling this right
    # now"; its grammar rejects the "|" outside [...|...], so the web UI returns the text as it
    # is (checked against its code), and so does ldm.
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


def test_schedule_of_the_web_ui_header_example():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]
    # get_learned_conditioning's docstring: switches after step 5 of 20.
    assert [end for end, _ in prompt_schedule("a [blue:green:5] jeweled crown", 20)] == [5, 20]


def test_schedule_numbers():
    # A decimal point makes a fraction of the steps, truncated and capped at steps.
    assert prompt_schedule("[a:b:0.5]", 7) == [(3, "a"), (7, "b")]
    assert prompt_schedule("[a:b:1.0]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:20]", 10) == [(10, "a")]
    # Exponents are numbers; 0, negative or past the end never switch.
    assert prompt_schedule("[a:b:1e1]", 20) == [(10, "a"), (20, "b")]
    assert prompt_schedule("[a:b:0]", 10) == [(10, "b")]
    assert prompt_schedule("[a:b:-2]", 10) == [(10, "b")]
    assert prompt_schedule("[a:b:0.05]", 10) == [(10, "b")]
    # Fewer steps than the switch: the first text throughout.
    assert prompt_schedule("a [b:3]", 2) == [(2, "a ")]
    with pytest.raises(ValueError, match="finite"):
        prompt_schedule("[a:b:1e400]", 10)


def test_schedule_rejected_and_literal_texts():
    # The grammar rejects a "|" outside [...|...]: no editing at all, the text as it is.
    assert prompt_schedule("a | b [c:2]", 10) == [(10, "a | b [c:2]")]
    assert prompt_schedule("a\\", 10) == [(10, "a\\")]
    # Escaped brackets are text to the editing grammar.
    assert prompt_schedule("\\[a:2]", 10) == [(10, "\\[a:2]")]
    # Not a construct ("b" is no number): text.
    assert prompt_schedule("[a:b]", 10) == [(10, "[a:b]")]
    assert prompt_schedule("[a:b] [c:2]", 10) == [(2, "[a:b] "), (10, "[a:b] c")]
    # An alternation nested in an edit.
    assert prompt_schedule("[[a|b]:3]", 5) == [(1, ""), (2, ""), (3, ""), (4, "b"), (5, "a")]


def test_editing_detection_and_validation():
    assert not has_editing(parse_editing("a (red:1.2) [blue] house"))
    assert has_editing(parse_editing("a [red:blue:0.5] house"))
    assert has_editing(parse_editing("a [red|blue] house"))
    assert parse_editing("a | b") is None
    assert texts_at_steps("a (red) house", None) == [(1, "a (red) house")]
    with pytest.raises(ValueError, match="pass steps"):
        texts_at_steps("a [red:blue:0.5] house", None)
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", 0)
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", True)
    with pytest.raises(TypeError, match="str"):
        prompt_schedule(3, 10)
