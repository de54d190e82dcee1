"""Tasks with checkable answers for the critical-token analysis (offline).

* :func:`builtin_arith` — a seeded generator of grade-school arithmetic word problems
  (``kind="word"``: one operation in a short story; ``kind="multistep"``: two or three chained
  operations), each with its exact answer.
* :func:`read_gsm8k` — a JSONL file in GSM8K style (``question``, ``answer`` ending in ``#### n``) or
  MATH style (``problem``, ``solution`` whose final answer is the last ``\\boxed{...}``, or ``answer``),
  read through :func:`analyses.core.io.iter_jsonl` (line-numbered errors).
* :func:`read_hf` — the same two styles from a Hugging Face dataset (``hf:openai/gsm8k:main:test``),
  streamed through :func:`analyses.core.io.open_hf`; offline it fails with one clear message.
* :func:`extract_answer` — the final answer of a model response: ``#### n``, then
  ``answer is n`` / ``answer: n``, then ``\\boxed{n}``, else the last number. The *first* marked
  answer wins, matching rollouts that stop as soon as an answer is written.
* Checkers (``checker(response_text) -> bool``): :class:`NumericChecker` (tolerance),
  :class:`ExactChecker` (normalised string) and :class:`CallableChecker` (a user function).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from probes.errors import ConfigError, InputError

__all__ = [
    "Problem", "builtin_arith", "read_gsm8k", "read_hf", "load_task", "extract_answer", "extract_boxed", "parse_number", "ANSWER_STOP",
    "Checker", "NumericChecker", "ExactChecker", "CallableChecker", "make_checker", "format_prompt", "INSTRUCTION",
]

INSTRUCTION = "Solve the problem step by step, then end with 'The answer is N.'"

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
_MARKED = [
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"answer\s*(?:is|:)\s*:?\s*(" + _NUM + ")", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
]
_ANY_NUM = re.compile(_NUM)
# A written final answer followed by a non-digit: rollouts may stop there.
ANSWER_STOP = re.compile(r"(?:####\s*|answer\s*(?:is|:)\s*:?\s*|\\boxed\{\s*)" + _NUM + r"(?:[^\d.,]|[.,]\D)", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer (a number or a string)."""

    question: str
    answer: float | str
    source: str = "builtin"
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def parse_number(s: str) -> float | None:
    """``"1,234.5"`` / ``"$12"`` -> float; ``None`` when not a number."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def extract_answer(text: str) -> str | None:
    """The final answer written in ``text`` (see the module docstring), or ``None``.

    >>> extract_answer("3 + 4 = 7. The answer is 7.")
    '7'
    >>> extract_answer("#### 1,200")
    '1200'
    """
    for rx in _MARKED:
        m = rx.search(text)
        if m:
            return _clean(m.group(1))
    nums = _ANY_NUM.findall(text)
    return _clean(nums[-1]) if nums else None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or ``None``.

    >>> extract_boxed(r"so $x = \\boxed{\\frac{1}{2}}$")
    '\\\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _clean(s: str) -> str:
    s = s.replace(",", "").replace("$", "")
    return s[:-1] if s.endswith(".") else s


class Checker:
    """``checker(response_text) -> bool``: is the response's final answer correct?"""

    def __call__(self, text: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class NumericChecker(Checker):
    """Correct when the extracted number is within ``tol`` (absolute) of ``answer``."""

    answer: float
    tol: float = 1e-6

    def __call__(self, text: str) -> bool:
        got = extract_answer(text)
        v = None if got is None else parse_number(got)
        return v is not None and abs(v - float(self.answer)) <= self.tol


@dataclass(frozen=True)
class ExactChecker(Checker):
    """Correct when the extracted answer equals ``answer`` after stripping and lower-casing
    (``extract=False`` compares the whole stripped response)."""

    answer: str
    extract: bool = True

    def __call__(self, text: str) -> bool:
        want = _norm_answer(str(self.answer))
        if not self.extract:
            return _norm_answer(text) == want
        cands = [extract_boxed(text), extract_answer(text)]
        return any(c is not None and _norm_answer(c) == want for c in cands)


def _norm_answer(s: str) -> str:
    return re.sub(r"\s+", "", s.strip().strip("$").rstrip(".")).lower()


@dataclass(frozen=True)
class CallableChecker(Checker):
    """Wraps a user function ``fn(response_text) -> bool``."""

    fn: Callable[[str], bool]

    def __call__(self, text: str) -> bool:
        return bool(self.fn(text))


def make_checker(problem: Problem, kind: Literal["auto", "numeric", "exact"] = "numeric", tol: float = 1e-6) -> Checker:
    """The checker for ``problem``'s reference answer (``"auto"``: numeric when the answer is a number)."""
    if kind == "auto":
        num = isinstance(problem.answer, (int, float)) or parse_number(str(problem.answer)) is not None
        kind = "numeric" if num else "exact"
    if kind == "numeric":
        v = problem.answer if isinstance(problem.answer, (int, float)) else parse_number(str(problem.answer))
        if v is None:
            raise InputError(f"the reference answer {problem.answer!r} is not a number.",
                             hint="Use checker='exact' for string answers.")
        return NumericChecker(float(v), tol)
    if kind == "exact":
        return ExactChecker(str(problem.answer))
    raise ConfigError(f"checker={kind!r} is not known.", hint="Use 'auto', 'numeric' or 'exact' (or pass a callable).")


# ------------------------------------------------------------------------------ built-in tasks
_NAMES = ["Tom", "Ann", "Sam", "Mia", "Ben", "Lea", "Max", "Zoe"]
_ITEMS = ["apples", "pencils", "marbles", "cookies", "stickers", "books"]


def _word(rng: random.Random) -> Problem:
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    op = rng.choice(["add", "sub", "mul"])
    if op == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return Problem(f"{n} has {a} {it}. {n} buys {b} more. How many {it} does {n} have now?", float(a + b))
    if op == "sub":
        a = rng.randint(8, 30)
        b = rng.randint(1, a - 1)
        return Problem(f"{n} has {a} {it} and gives {b} of them away. How many {it} does {n} have left?", float(a - b))
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return Problem(f"{n} has {a} boxes with {b} {it} in each box. How many {it} does {n} have?", float(a * b))


def _multistep(rng: random.Random) -> Problem:
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 10)
    total = a * b - c
    if total <= 0:
        c = 1
        total = a * b - c
    return Problem(f"{n} buys {a} bags of {it} with {b} {it} in each bag, then gives {c} {it} to a friend. "
                   f"How many {it} does {n} have now?", float(total))


def builtin_arith(n: int = 1, *, seed: int = 0, kind: Literal["word", "multistep"] = "word") -> list[Problem]:
    """``n`` seeded arithmetic word problems with exact answers (same seed -> same problems)."""
    if n < 1:
        raise ConfigError(f"n={n} problems; give at least 1.")
    if kind not in ("word", "multistep"):
        raise ConfigError(f"kind={kind!r} is not known.", hint="Use 'word' or 'multistep'.")
    rng = random.Random(seed)
    make = _word if kind == "word" else _multistep
    return [Problem(p.question, p.answer, source=f"builtin-{kind}", line=i + 1) for i, p in ((i, make(rng)) for i in range(n))]


def _problem_from(obj: dict[str, Any], where: str) -> tuple[Problem | None, str]:
    """One GSM8K- or MATH-style record -> (Problem, "") or (None, why it cannot be used)."""
    q = obj.get("question", obj.get("problem"))
    if not isinstance(q, str) or not q.strip():
        return None, "an empty or missing question ('question' or 'problem')"
    raw = obj.get("answer")
    if raw is None and isinstance(obj.get("solution"), str):  # MATH: the last boxed expression
        raw = extract_boxed(obj["solution"])
        if raw is None:
            return None, "a solution without a \\boxed{...} final answer"
    if raw is None:
        return None, "no answer ('answer', or 'solution' with \\boxed{...})"
    ref: float | str | None = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        ref = float(raw)
    elif isinstance(raw, str) and raw.strip():
        m = re.search(r"####\s*(.+?)\s*$", raw.strip())
        if m:
            ref = parse_number(m.group(1))
        elif "solution" in obj or "problem" in obj:  # MATH answers may be expressions
            ref = parse_number(raw) if parse_number(raw) is not None else raw.strip()
        else:
            ref = parse_number(raw)
    if ref is None:
        return None, f"an answer the extractor cannot parse ({str(raw)[-40:]!r})"
    return Problem(q.strip(), ref, source=where), ""


def read_gsm8k(path: str | Path, *, limit: int | None = None, on_error: Literal["skip", "stop"] = "stop") -> list[Problem]:
    """Problems from a JSONL file, GSM8K style ``{"question": ..., "answer": "... #### 42"}`` or MATH style
    ``{"problem": ..., "solution": "... \\boxed{42}"}`` (or ``"answer"``).

    A line without a question/answer, or whose answer cannot be parsed, raises :class:`InputError`
    naming the line (``on_error="skip"`` skips it with a warning).
    """
    from .core.io import iter_jsonl, skipped

    out: list[Problem] = []
    name = Path(path).name
    for no, obj in iter_jsonl(path, on_error=on_error):
        prob, why = _problem_from(obj, name)
        if prob is None:
            msg = f"{name} line {no} has {why}."
            if on_error == "stop":
                raise InputError(msg, hint="GSM8K answers end with '#### <number>', MATH solutions with \\boxed{...}; "
                                           "fix the line or pass --on-error skip.")
            skipped(msg)
            continue
        out.append(Problem(prob.question, prob.answer, source=name, line=no))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{name} holds no usable problem.",
                         hint="Each line needs 'question' + 'answer' ('... #### n') or 'problem' + 'solution' (\\boxed{...}).")
    return out


def read_hf(spec: str, *, limit: int | None = None, on_error: Literal["skip", "stop"] = "stop") -> list[Problem]:
    """Problems from a Hugging Face dataset in GSM8K or MATH style, streamed: ``hf:NAME[:CONFIG]:SPLIT``
    (:func:`analyses.core.io.parse_hf_spec`), e.g. ``hf:openai/gsm8k:main:test``."""
    from .core.io import open_hf, skipped

    label, rows = open_hf(spec)
    out: list[Problem] = []
    for i, obj in enumerate(rows, start=1):
        prob, why = _problem_from(dict(obj), label)
        if prob is None:
            if on_error == "stop":
                raise InputError(f"{label} row {i} has {why}.", hint="Pass --on-error skip, or pick a GSM8K/MATH-style dataset.")
            skipped(f"{label} row {i} has {why}")
            continue
        out.append(Problem(prob.question, prob.answer, source=label, line=i))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{label} gave no usable problem.", hint="It needs 'question'+'answer' or 'problem'+'solution' fields.")
    return out


def load_task(task: str, n: int = 1, *, seed: int = 0, on_error: Literal["skip", "stop"] = "stop") -> list[Problem]:
    """``builtin-arith`` / ``builtin-multistep`` (generated), ``hf:NAME[:CONFIG]:SPLIT`` (Hugging Face
    datasets, streamed) or a path to a GSM8K- or MATH-style JSONL file."""
    if task in ("builtin-arith", "builtin-word"):
        return builtin_arith(n, seed=seed, kind="word")
    if task == "builtin-multistep":
        return builtin_arith(n, seed=seed, kind="multistep")
    if task.startswith("hf:"):
        return read_hf(task, limit=n, on_error=on_error)
    p = Path(task)
    if p.suffix in (".jsonl", ".json", ".ndjson") or p.exists():
        return read_gsm8k(p, limit=n, on_error=on_error)
    raise InputError(f"--task {task!r} is neither a built-in task, an hf: dataset nor an existing file.",
                     hint="Use builtin-arith, builtin-multistep, hf:openai/gsm8k:main:test or a GSM8K/MATH-style .jsonl path.")


def format_prompt(probe: Any, problem: Problem | str, *, instruction: str = INSTRUCTION) -> str:
    """The prompt text for a problem: the model's chat template when it has one, else
    ``Question: ...\\nAnswer:``."""
    q = problem.question if isinstance(problem, Problem) else str(problem)
    tok = probe.tokenizer
    if getattr(tok, "chat_template", None):
        return probe.chat(f"{q} {instruction}".strip())
    return f"Question: {q}\nAnswer:"
