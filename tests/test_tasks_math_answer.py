"""Final-answer extraction and numeric equivalence for GSM8K-style math, and the math reward."""

from __future__ import annotations

from fractions import Fraction

import pytest

from async_grpo.tasks.math_answer import answers_equal, extract_final_answer, parse_number, reference_answer
from async_grpo.tasks.math_task import math_reward, math_verify_installed

# (completion, expected extracted span, expected style, reference, expected match)
CASES = [
    ("So she has \\boxed{72} apples.", "72", "boxed", "72", True),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed", "0.5", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{3}", "boxed", "0.333", False),
    ("The answer is 0.5", "0.5", "phrase", "1/2", True),
    ("Step one.\n#### 1,234", "1,234", "hash", "1234", True),
    ("The total is $1,234.50.", "1,234.50", "last_number", "1234.5", True),
    ("It costs \\$18.00", "18.00", "last_number", "18", True),
    ("The answer is 50%", "50%", "phrase", "50", True),
    ("The temperature dropped to -7 degrees", "-7", "last_number", "-7", True),
    ("The answer is \u22127", "\u22127", "phrase", "-7", True),
    ("She walks 3 miles then 4 miles, 7 miles in total.", "7", "last_number", "7", True),
    ("First 12, then 15. So the answer is 12 and not 15", "12 and not 15", "phrase", "12", True),
    ("I don't know.", None, None, "5", False),
    ("", None, None, "5", False),
    ("\\boxed{\\text{5 apples}}", "\\text{5 apples}", "boxed", "5", True),
    ("\\boxed{5\\text{ cm}}", "5\\text{ cm}", "boxed", "5", True),
    ("\\boxed{x = 12}", "x = 12", "boxed", "12", True),
    ("\\boxed{1{,}000}", "1{,}000", "boxed", "1000", True),
    ("\\boxed{1\\,000}", "1\\,000", "boxed", "1000", True),
    ("#### 72\nThen 9 more words 9", "72", "hash", "72", True),
    ("We get \\boxed{3} first, then fix it: \\boxed{4}", "4", "boxed", "4", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}", "boxed", "0.75", True),
    ("\\boxed{-\\frac{3}{4}}", "-\\frac{3}{4}", "boxed", "-0.75", True),
    ("\\boxed{\\frac{-3}{4}}", "\\frac{-3}{4}", "boxed", "-3/4", True),
    ("The answer is 3/4", "3/4", "phrase", "0.75", True),
    ("The answer is 1 1/2 cups", "1 1/2 cups", "phrase", "1.5", True),
    ("72.0", "72.0", "last_number", "72", True),
    ("72.5", "72.5", "last_number", "72", False),
    ("The answer is 7", "7", "phrase", "-7", False),
    ("the answer is: 42.", "42.", "phrase", "42", True),
    ("Final answer: 100", "100", "phrase", "100", True),
    ("That makes 1,000,000 people", "1,000,000", "last_number", "1000000", True),
    ("\\boxed{}", "", "boxed", "0", False),
    ("unclosed \\boxed{\\frac{1}{2}", "1/2", "last_number", "0.5", True),
    ("There are 5 boxes with 12 eggs each, so 60 eggs.", "60", "last_number", "60", True),
    ("The answer is five", None, None, "5", False),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", "boxed", "\\sqrt{2}", True),
    ("\\boxed{yes}", "yes", "boxed", "Yes", True),
    ("\\boxed{0.50}", "0.50", "boxed", "1/2", True),
    ("\\boxed{2/4}", "2/4", "boxed", "0.5", True),
    ("\\fbox{9}", "9", "boxed", "9", True),
    ("The answer is \\boxed{12}. Check: 3*4=12, and 5 more is 17", "12", "boxed", "12", True),
    ("\\boxed{12\\%}", "12\\%", "boxed", "12", True),
    ("He has +5 points", "+5", "last_number", "5", True),
    ("\\boxed{.5}", ".5", "boxed", "0.5", True),
    ("\\boxed{\\frac{3}{4}\\text{ of the pie}}", "\\frac{3}{4}\\text{ of the pie}", "boxed", "0.75", True),
    ("\\boxed{{5}}", "{5}", "boxed", "5", True),
    ("#### $1,000", "$1,000", "hash", "1000", True),
    ("60 minutes is 1 hour, so 2 hours", "2", "last_number", "2", True),
    ("The answer is 3.14159", "3.14159", "phrase", "3.14", False),
    ("so x is -.5", "-.5", "last_number", "-1/2", True),
    ("from 10 to 3-4", "4", "last_number", "4", True),
    ("10 - 4 = 6", "6", "last_number", "6", True),
    ("The answer is 1,5", "1,5", "phrase", "1.5", False),  # a decimal comma reads as 1 (GSM8K uses points)
    ("\\boxed{1,234}", "1,234", "boxed", "1,234", True),
    ("\\boxed{\\$1,234}", "\\$1,234", "boxed", "$1234", True),
]


def test_the_table_has_at_least_forty_cases_and_both_outcomes():
    assert len(CASES) >= 40
    assert sum(1 for case in CASES if not case[-1]) >= 8


@pytest.mark.parametrize(("completion", "span", "style", "reference", "match"), CASES)
def test_final_answer_extraction_and_equivalence(completion, span, style, reference, match):
    final = extract_final_answer(completion)
    if span is None:
        assert final is None
    else:
        assert (final.text, final.style) == (span, style)
    predicted = final.text if final is not None else ""
    assert answers_equal(predicted, reference) is match


def test_parse_number_values_are_exact_fractions():
    assert parse_number("$1,234.50") == Fraction(2469, 2)
    assert parse_number("\\frac{22}{7}") == Fraction(22, 7)
    assert parse_number("1 1/2") == Fraction(3, 2)
    assert parse_number("-0.125") == Fraction(-1, 8)
    assert parse_number("3/0") is None
    assert parse_number("no digits") is None


def test_reference_answer_is_the_text_after_the_last_hashes():
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert reference_answer(gsm8k) == "72"
    assert reference_answer("  1,000 ") == "1,000"


def test_math_reward_adds_the_format_bonus_only_for_the_expected_marking():
    item = {"answer": "72"}
    assert math_reward("q", "so \\boxed{72}", item, format_reward=0.25) == 1.25
    assert math_reward("q", "so \\boxed{71}", item, format_reward=0.25) == 0.25  # format right, answer wrong
    assert math_reward("q", "The answer is 72", item, format_reward=0.25) == 1.0  # right, but not boxed
    assert math_reward("q", "no idea", item, format_reward=0.25) == 0.0
    assert math_reward("q", "#### 72", item, format_reward=0.5, answer_format="hash") == 1.5
    assert math_reward("q", "\\boxed{72}", item, format_reward=0.5, answer_format="hash") == 1.0


@pytest.mark.skipif(not math_verify_installed(), reason="math-verify is not installed (optional dependency)")
def test_math_verify_decides_references_the_builtin_parser_cannot_read():
    item = {"answer": "\\frac{1}{\\sqrt{2}}"}
    assert math_reward("q", "\\boxed{\\frac{\\sqrt{2}}{2}}", item) == 1.0
    assert math_reward("q", "\\boxed{\\frac{\\sqrt{2}}{2}}", item, verifier="builtin") == 0.0
    assert math_reward("q", "\\boxed{\\sqrt{3}}", item) == 0.0
