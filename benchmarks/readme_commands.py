"""Run every `sonde` command of the README's gallery and check the figures the README prints beside it.

    python benchmarks/readme_commands.py                 # the commands under 3 minutes (not those marked long)
    python benchmarks/readme_commands.py --all           # every gallery command, the long ones too
    python benchmarks/readme_commands.py -k routes -k sinks   # the commands whose text contains one of these
    python benchmarks/readme_commands.py --record        # also append a dated row to benchmarks/RESULTS.md and
                                                         # refresh the README's times (docs/build_readme.py)

Each command runs as written, on the embedded model, in a fresh empty folder with a private results store
(``$SONDE_RESULTS``), so a file one command writes (``lens.html``) never blocks the next. A command passes when it
exits 0 within ``--timeout`` and every ``key: value`` line the README quotes for it appears in its output: text
exactly, numbers within the tolerance declared in ``docs/readme_numbers.GALLERY`` (else two units of the last digit
shown; whole numbers exactly). Run it before each release commit; it prints one line per command (pass/fail, wall-clock time) and exits 1
when one fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
sys.path.insert(0, str(ROOT / "docs"))


@dataclass
class Command:
    line: str  # as the README shows it, without its comment
    verb: str
    prints: list[str] = field(default_factory=list)
    long: bool = False  # marked `long:` (over 3 minutes on 2 idle cores)


def gallery(readme: str) -> list[Command]:
    """The README gallery's commands and the ``key: value`` figures it quotes beside each (``* `verb` prints ...``)."""
    text = readme.split("\n## Gallery", 1)[1].split("\n## ", 1)[0]
    cmds: list[Command] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced and line.startswith("sonde "):
            cmd, _, comment = line.partition("   # ")
            cmds.append(Command(cmd.strip(), shlex.split(cmd)[2], long=comment.startswith("long:")))
        elif not fenced and (m := re.match(r"\* `([\w-]+)` prints (`[^`]+`(?:, `[^`]+`)*)", line)):
            for c in cmds:  # the quoted figures come first; a note after them ("; ...") is not checked
                if c.verb == m.group(1) and not c.prints:
                    c.prints = re.findall(r"`([^`]+)`", m.group(2))
                    break
    return cmds


def _number(s: str) -> tuple[float, int] | None:
    m = re.fullmatch(r"\s*(-?\d+(?:\.(\d+))?)\s*", s)
    return (float(m.group(1)), len(m.group(2) or "")) if m else None


def check_output(out: str, prints: list[str], tol: float | None = None) -> list[str]:
    """The quoted figures that ``out`` does not show (empty: all shown)."""
    lines = out.splitlines()
    missing = []
    for want in prints:
        key, sep, value = want.partition(": ")
        got = [ln.partition(": ")[2] for ln in lines if sep and ln.startswith(key + ": ")]
        if not sep:
            ok = any(want in ln for ln in lines)
        elif (w := _number(value)) is not None:
            t = tol if tol is not None else (2 * 10 ** -w[1] if w[1] else 0)
            ok = any((g := _number(x)) is not None and abs(g[0] - w[0]) <= t + 1e-12 for x in got)
        else:
            ok = any(x.strip() == value.strip() for x in got)
        if not ok:
            missing.append(f"{want!r} (got {got[0].strip()!r})" if got else f"{want!r} (no such line)")
    return missing


def _sonde() -> list[str]:
    exe = Path(sys.executable).with_name("sonde")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from analyses.cli import main; main()"]


def run_one(cmd: Command, timeout: float, tol: float | None) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix="sonde-readme-") as tmp:
        env = {**os.environ, "SONDE_RESULTS": str(Path(tmp) / "results"), "PYTHONPATH": str(ROOT)}
        argv = _sonde() + shlex.split(cmd.line)[1:]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, time.perf_counter() - t0, f"no result within {timeout:.0f} s"
        dt = time.perf_counter() - t0
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        return False, dt, f"exit {p.returncode}: {err[:200]}"
    missing = check_output(p.stdout, cmd.prints, tol)
    return (not missing), dt, ("; ".join(missing) if missing else "")


def fmt_time(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def record(rows: list[tuple[Command, bool, float | None, str]], loads: list[float], note: str) -> None:
    day = datetime.date.today().isoformat()
    cores = os.cpu_count()
    head = (f"## {day} — README commands (`benchmarks/readme_commands.py`), {cpu_name()}, {cores} cores, "
            f"load average {min(loads):.0f}–{max(loads):.0f}")
    body = ["", head, ""]
    if note:
        body += [note, ""]
    body += ["| command | result | time |", "|---|---|---|"]
    for cmd, ok, dt, why in rows:
        result = "pass" if ok else ("not run: " + why if dt is None else "FAIL: " + why.replace("|", "/"))
        body.append(f"| `{cmd.line}` | {result} | {'' if dt is None else fmt_time(dt)} |")
    text = RESULTS.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(body) + "\n"
    RESULTS.write_text(text, encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "docs" / "build_readme.py")], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="also the commands marked long (over 3 minutes)")
    ap.add_argument("-k", action="append", default=[], help="only commands containing this text (repeatable)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per command (default 900)")
    ap.add_argument("--budget", type=float, default=None,
                    help="start no command after this many seconds; the rest are recorded as not run")
    ap.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="", help="a sentence for the recorded section (e.g. what else ran)")
    args = ap.parse_args(argv)

    import readme_numbers

    tols = {ex.command: (ex.tol or None) for ex in readme_numbers.GALLERY}
    cmds = gallery((ROOT / "README.md").read_text(encoding="utf-8"))
    cmds = [c for c in cmds if (args.all or not c.long) and (not args.k or any(k in c.line for k in args.k))]
    if not cmds:
        print("error: no gallery command matches", file=sys.stderr)
        return 2
    rows, loads, start = [], [os.getloadavg()[0]], time.monotonic()
    for cmd in cmds:
        if args.budget is not None and time.monotonic() - start > args.budget:
            rows.append((cmd, False, None, f"the run's {args.budget:.0f} s budget was spent"))
            print(f"skip  {'':>8}  {cmd.line}", flush=True)
            continue
        ok, dt, why = run_one(cmd, args.timeout, tols.get(cmd.line))
        loads.append(os.getloadavg()[0])
        rows.append((cmd, ok, dt, why))
        print(f"{'pass' if ok else 'FAIL'}  {fmt_time(dt):>8}  {cmd.line}" + (f"\n      {why}" if why else ""), flush=True)
    print(f"{sum(r[1] for r in rows)} passed, {sum(not r[1] and r[2] is not None for r in rows)} failed, "
          f"{sum(r[2] is None for r in rows)} not run")
    if args.record:
        record(rows, loads, args.note)
    return 0 if all(r[1] for r in rows if r[2] is not None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
