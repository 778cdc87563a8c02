"""Finding a model's final answer in a math solution and deciding whether it equals the reference.

Extraction, most explicit first (the last occurrence of each wins, since models restate numbers):
    1. `\\boxed{...}` (braces matched, so `\\boxed{\\frac{1}{2}}` yields `\\frac{1}{2}`)
    2. `#### 42` (the GSM8K convention; the rest of the line)
    3. "the answer is 42" / "answer: 42" (the rest of the line, if it holds a number)
    4. the last number anywhere in the text
Numbers are read exactly, as `Fraction`s: signs (also U+2212), thousands separators (`1,234`,
`1{,}234`, `1\\,234`), decimals, fractions (`3/4`, `\\frac{3}{4}`, mixed `1 1/2`), with currency (`$`),
percent signs, LaTeX wrappers and trailing units ignored: `$1,234.50`, `50%` and `12 apples` read as
1234.5, 50 and 12. `50%` therefore equals a reference of 50, not 0.5 (GSM8K writes percentages so).
Two numbers are equal when their exact values are: `0.5` equals `1/2`; `0.333` does not equal `1/3`.
Non-numeric answers compare as normalised text, or through math-verify when the task enables it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

ANSWER_STYLES = ("boxed", "hash", "phrase", "last_number")


@dataclass(frozen=True)
class FinalAnswer:
    """The answer span a solution ends with, and how it was marked."""

    text: str
    style: str  # one of ANSWER_STYLES


# A number: optional sign (not after a letter, digit or ")" so "3-4" is 3 and 4), then a mixed number,
# a comma-grouped or plain integer with optional decimals and optional "/denominator", or ".5".
_NUMBER = re.compile(
    r"(?<![\w)])(?P<sign>[-+])?"
    r"(?:(?P<whole>\d+)\s+(?P<mnum>\d+)\s*/\s*(?P<mden>\d+)(?![\d.])"
    r"|(?P<int>\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?P<dec>\.\d+)?(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    r"|(?P<bare>\.\d+))"
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PHRASE = re.compile(r"\banswer\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}|\\[dt]?frac\s*(\d)\s*(\d)")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")


def extract_final_answer(text: str) -> FinalAnswer | None:
    """The final answer of a solution, or None when it states none (no marker and no number)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return FinalAnswer(boxed.strip(), "boxed")
    if "####" in text:
        line = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        if line:
            return FinalAnswer(line, "hash")
    for match in reversed(list(_PHRASE.finditer(text))):
        line = text[match.end() :].split("\n", 1)[0].strip()
        if parse_number(line) is not None:
            return FinalAnswer(line, "phrase")
    numbers = list(_NUMBER.finditer(normalize_latex(text)))
    if numbers:
        return FinalAnswer(numbers[-1].group(0).strip(), "last_number")
    return None


def reference_answer(answer_field: str) -> str:
    """The reference answer of a GSM8K-style record: the text after its last `####`, else all of it."""
    if "####" in answer_field:
        return answer_field.rsplit("####", 1)[1].strip()
    return answer_field.strip()


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for pos in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if depth == 0:
                return text[match.end() : pos]
        # An unclosed brace: an earlier \boxed may still be whole.
    return None


def _frac_as_division(match: re.Match) -> str:
    numerator, denominator = match.group(1) or match.group(3), match.group(2) or match.group(4)
    return f"({numerator.strip()})/({denominator.strip()})"


def normalize_latex(text: str) -> str:
    """LaTeX number notation as plain text: fractions as a/b, no $ \\% \\text{}, thin-space separators gone."""
    text = text.replace("\u2212", "-").replace("\\left", "").replace("\\right", "")
    text = _TEXT_WRAPPER.sub(r" \1", text)
    text = re.sub(r"(\d)\{,\}(\d)", r"\1,\2", text)
    text = re.sub(r"(\d)\\[,!;: ]\s*(\d)", r"\1\2", text)  # 1\,000: a LaTeX thin space between digit groups
    text = _FRAC.sub(_frac_as_division, text)  # flat fractions only: \frac{\frac{..}{..}}{..} is not read
    text = re.sub(r"\((-?[\d.]+)\)/\((-?[\d.]+)\)", r"\1/\2", text)
    return text.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", " ").replace("~", " ")


def parse_number(text: str) -> Fraction | None:
    """The exact value of the number an answer span states, or None when it states none.

    Only the part after the last "=" counts (`x = 5` is 5); in it, the first number.
    """
    text = normalize_latex(text)
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    match = _NUMBER.search(text)
    if match is None:
        return None
    sign = -1 if match.group("sign") == "-" else 1
    if match.group("whole") is not None:
        value = int(match.group("whole")) + Fraction(int(match.group("mnum")), int(match.group("mden")))
    elif match.group("bare") is not None:
        value = Fraction(match.group("bare"))
    else:
        value = Fraction(match.group("int").replace(",", "") + (match.group("dec") or ""))
        if match.group("den") is not None:
            denominator = Fraction(match.group("den"))
            if denominator == 0:
                return None
            value /= denominator
    return sign * value


def _normalize_text(text: str) -> str:
    text = normalize_latex(text).lower()
    return re.sub(r"[\s${}]|\.$", "", text).rstrip(".")


def is_plain_number(text: str) -> bool:
    """Whether a reference answer is just a number (with $, % or a final period at most)."""
    bare = normalize_latex(text).strip().strip("$").rstrip(".").rstrip("%").strip()
    match = _NUMBER.fullmatch(bare)
    return match is not None


def answers_equal(predicted: str, reference: str) -> bool:
    """Whether an extracted answer equals the reference: exactly as numbers, else as normalised text."""
    if is_plain_number(reference):
        return parse_number(predicted) == parse_number(reference)
    return _normalize_text(predicted) == _normalize_text(reference) != ""
