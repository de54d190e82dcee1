"""Built-in offline text domains for per-domain statistics (sinks, dormant heads), plus user JSONL.

Guo et al. 2024 (arXiv 2410.13835) compare heads across RedPajama subsets; Gu et al. 2024
(arXiv 2410.10781) use 100 natural-text samples plus "random" and "repeat" controls. Neither data
set ships offline, so Sonde builds its own domains from what every Python install holds:

==============  ==========================================================================
domain          source (fixed seed, fixed size)
==============  ==========================================================================
``prose``       English help text of ``pydoc_data.topics`` (paragraph windows)
``code``        Python standard-library sources (a fixed list of modules)
``arithmetic``  generated "a + b = c" equations and number sequences
``random``      T token ids drawn uniformly from the vocabulary (token-level control)
``repeat``      one random token id repeated T times (token-level control)
==============  ==========================================================================

A user JSONL file with ``text`` and ``domain`` fields adds its own domains (:func:`load_jsonl`), and
``hf:NAME[:CONFIG]:SPLIT[:FIELD]`` names a Hugging Face data set streamed as one more text domain
(online only; offline it fails with one line).

For dataset sweeps (:mod:`analyses.core.cluster`) :func:`corpus_records` lists a labelled corpus of
several text domains in a fixed order, and :func:`shard_ranges` cuts any item count into
contiguous shards, so a sharded run sees the same items in the same order as one pass.

:func:`domain_tokens` turns a domain into an equal-length batch ``[S, T]``: texts are tokenized,
those shorter than T tokens are skipped (and counted), the rest truncated to their first T tokens,
so no padding enters an attention statistic.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch

from probes.errors import ConfigError, InputError

__all__ = ["BUILTIN", "TEXT_DOMAINS", "TOKEN_DOMAINS", "domain_texts", "domain_tokens", "draw_texts", "texts_to_tokens",
           "load_jsonl", "DomainBatch", "check_domains", "corpus_records", "shard_ranges"]

TEXT_DOMAINS = ("prose", "code", "arithmetic")
TOKEN_DOMAINS = ("random", "repeat")
BUILTIN = TEXT_DOMAINS + TOKEN_DOMAINS

# fixed list so the corpus is the same on every machine with the same Python minor version
_CODE_MODULES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "heapq.py", "bisect.py", "fractions.py",
                 "statistics.py", "string.py", "shlex.py", "difflib.py", "calendar.py", "argparse.py", "functools.py",
                 "glob.py", "fnmatch.py", "colorsys.py", "graphlib.py", "dataclasses.py", "copy.py", "random.py")
_CHARS = 1200  # characters per text window: > 64 tokens for any BPE tokenizer on prose/code


@dataclass(frozen=True)
class DomainBatch:
    """Tokens of one domain: ``tokens`` [S, T] ids, ``n_skipped`` texts shorter than T tokens."""

    name: str
    tokens: torch.Tensor
    n_skipped: int = 0
    n_given: int = 0


def check_domains(names: Sequence[str], extra: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` for an unknown domain name."""
    known = tuple(BUILTIN) + tuple(extra)
    bad = [n for n in names if n not in known and not str(n).startswith("hf:")]
    if bad:
        raise ConfigError(f"unknown domain {bad[0]!r}.",
                          hint=f"Built-in domains: {', '.join(BUILTIN)}" + (f"; from your file: {', '.join(extra)}" if extra else "")
                          + ". Pass --input FILE.jsonl with a 'domain' field for your own, or hf:NAME[:CONFIG]:SPLIT[:FIELD].")


def _prose(n: int, seed: int) -> list[str]:
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    paras = []
    for key in sorted(topics):
        # plain paragraphs only (skip indented code and grammar blocks) so the domain reads as prose
        for para in topics[key].split("\n\n"):
            lines = [ln for ln in para.splitlines() if ln.strip()]
            if lines and not any(ln.startswith("   ") for ln in lines):
                p = " ".join(ln.strip() for ln in lines)
                if len(p) > 300 and p.count(" ") > 40:
                    paras.append(p)
    rng.shuffle(paras)
    return [p[:_CHARS] for p in paras[:n]]


def _code(n: int, seed: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    out: list[str] = []
    files = [root / m for m in _CODE_MODULES if (root / m).is_file()]
    per = max(1, -(-n // max(len(files), 1)))
    for f in files:
        src = f.read_text(encoding="utf-8", errors="replace")
        lines = src.splitlines(keepends=True)
        # windows start at line boundaries
        starts = sorted(rng.sample(range(0, max(1, len(lines) - 60)), min(per, max(1, len(lines) - 60))))
        for s in starts:
            out.append("".join(lines[s:s + 60])[:_CHARS])
    rng.shuffle(out)
    return out[:n]


def _arithmetic(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            parts = []
            for _ in range(20):
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                op = rng.choice("+-*")
                c = a + b if op == "+" else a - b if op == "-" else a * b
                parts.append(f"{a} {op} {b} = {c}.")
            out.append(" ".join(parts))
        else:
            a, d = rng.randint(0, 500), rng.randint(1, 37)
            kind = rng.choice(("arith", "square", "fib"))
            if kind == "arith":
                seq = [a + d * j for j in range(60)]
            elif kind == "square":
                seq = [(a % 20 + j) ** 2 for j in range(60)]
            else:
                x, y = a % 10, d % 10 + 1
                seq = []
                for _ in range(40):
                    seq.append(x)
                    x, y = y, x + y
            out.append(", ".join(str(v) for v in seq))
    return out


def domain_texts(name: str, n: int = 100, seed: int = 0) -> list[str]:
    """``n`` texts of a built-in text domain (``prose``, ``code``, ``arithmetic``), fixed by ``seed``, or the
    first ``n`` rows of ``hf:NAME[:CONFIG]:SPLIT[:FIELD]`` (streamed)."""
    if n < 1:
        raise ConfigError(f"n={n}; use at least 1 sample per domain.")
    if name == "prose":
        return _prose(n, seed)
    if name == "code":
        return _code(n, seed)
    if name == "arithmetic":
        return _arithmetic(n, seed)
    if name.startswith("hf:"):
        from .io import iter_hf

        return [r.text for r in iter_hf(name, limit=n, on_error="skip")]
    if name in TOKEN_DOMAINS:
        raise ConfigError(f"domain {name!r} is token-level (no texts).", hint="Use domain_tokens(probe, name, ...).")
    check_domains([name])
    raise AssertionError(name)


def texts_to_tokens(probe, texts: Sequence[str], T: int, *, prepend_bos: bool | None = None) -> tuple[torch.Tensor, int]:
    """Tokenize texts, keep those with at least T tokens, truncated to their first T.

    Returns ``(tokens [S, T], n_skipped)``. ``prepend_bos`` as in ``probe.to_tokens``.
    """
    rows, skipped = [], 0
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            skipped += 1
            continue
        ids = probe.to_tokens(t, prepend_bos=prepend_bos, max_length=T, truncate=True)[0]  # tokenizes a prefix only
        if ids.shape[0] < T:
            skipped += 1
            continue
        rows.append(ids[:T])
    if not rows:
        return torch.zeros(0, T, dtype=torch.long, device=probe.device), skipped
    return torch.stack(rows), skipped


def _special_ids(probe) -> set[int]:
    tok = probe.tokenizer
    return {int(i) for i in (getattr(tok, "all_special_ids", None) or []) if i is not None}


def domain_tokens(probe, name: str, *, n: int = 100, T: int = 64, seed: int = 0,
                  prepend_bos: bool | None = None, texts: Sequence[str] | None = None) -> DomainBatch:
    """An equal-length batch ``[S, T]`` for a domain.

    Text domains (built-in or ``texts`` given) are tokenized and truncated; texts shorter than T
    tokens are skipped and counted. ``random`` draws T ids uniformly from the non-special
    vocabulary; ``repeat`` repeats one random id T times. For token domains ``prepend_bos=True``
    makes position 0 the BOS token (the remaining T-1 positions are the control tokens).
    """
    if T < 2:
        raise ConfigError(f"T={T}; use a sequence length of at least 2.")
    if texts is None and name in TOKEN_DOMAINS:
        g = torch.Generator().manual_seed(seed)
        V = probe.info.d_vocab
        special = _special_ids(probe)
        allowed = torch.tensor([i for i in range(min(V, len(probe.tokenizer))) if i not in special])
        if name == "random":
            ids = allowed[torch.randint(len(allowed), (n, T), generator=g)]
        else:
            ids = allowed[torch.randint(len(allowed), (n, 1), generator=g)].expand(n, T).clone()
        bos = probe.bos_token_id
        if prepend_bos and bos is not None:
            ids = torch.cat([torch.full((n, 1), bos, dtype=ids.dtype), ids[:, : T - 1]], dim=1)
        return DomainBatch(name, ids.to(probe.device), 0, n)
    if texts is None:
        drawn, toks = _draw(probe, name, n=n, T=T, seed=seed, prepend_bos=prepend_bos)
        return DomainBatch(name, toks, len(drawn) - toks.shape[0], len(drawn))
    toks, skipped = texts_to_tokens(probe, list(texts)[:n], T, prepend_bos=prepend_bos)
    return DomainBatch(name, toks, skipped, min(len(texts), n))


def _draw(probe, name: str, *, n: int, T: int, seed: int, prepend_bos: bool | None) -> tuple[list[str], torch.Tensor]:
    """``(texts, tokens [S, T])``: the texts a sampled run of text domain ``name`` measures and their tokens (see
    :func:`draw_texts`)."""
    candidates = domain_texts(name, n=2 * n, seed=seed)  # extra texts, so that skipping short ones still leaves n
    rows, used = [], 0
    for t in candidates:  # the shortest prefix of the candidates that holds n long-enough texts
        used += 1
        row, _ = texts_to_tokens(probe, [t], T, prepend_bos=prepend_bos)
        if row.shape[0]:
            rows.append(row)
            if len(rows) == n:
                break
    toks = torch.cat(rows) if rows else torch.zeros(0, T, dtype=torch.long, device=probe.device)
    return candidates[:used], toks


def draw_texts(probe, name: str, *, n: int, T: int, seed: int = 0, prepend_bos: bool | None = None) -> list[str]:
    """The texts a sampled run of the text domain ``name`` measures, the same for every engine.

    ``2n`` texts are drawn with ``seed`` (:func:`domain_texts`), and the shortest prefix of them that holds ``n``
    texts of at least ``T`` tokens is kept (all ``2n`` when fewer are long enough). A one-pass run
    (:func:`domain_tokens`) measures the long-enough texts of this prefix; a sweep shards the prefix itself, so its
    shards skip the same short texts and measure the same ``n`` rows."""
    return _draw(probe, name, n=n, T=T, seed=seed, prepend_bos=prepend_bos)[0]


def load_jsonl(path: str | Path, *, on_error: Literal["skip", "stop"] = "stop",
               default_domain: str = "user") -> dict[str, list[str]]:
    """``{domain: [texts]}`` from a JSONL file (``text`` field; ``domain`` field, else ``default_domain``)
    or a plain text file (one text per line, all in ``default_domain``)."""
    from .io import iter_records

    out: dict[str, list[str]] = {}
    for r in iter_records(path, on_error=on_error):
        out.setdefault(r.domain or default_domain, []).append(r.text)
    if not out:
        raise InputError(f"{str(path)!r} holds no texts.", hint="Give one JSON object per line with a 'text' field.")
    return out


def resolve(probe, domains: Sequence[str] | Mapping[str, Sequence[str]], *, n: int, T: int, seed: int,
            prepend_bos: bool | None) -> list[DomainBatch]:
    """Batches for a list of built-in names or a ``{name: texts}`` mapping (user domains)."""
    if isinstance(domains, Mapping):
        return [domain_tokens(probe, k, n=n, T=T, seed=seed, prepend_bos=prepend_bos, texts=list(v)) for k, v in domains.items()]
    names = list(domains)
    if not names:
        raise ConfigError("no domain was given.", hint=f"Name one or more of: {', '.join(BUILTIN)}.")
    check_domains(names)
    return [domain_tokens(probe, k, n=n, T=T, seed=seed, prepend_bos=prepend_bos) for k in names]


def corpus_records(names: Sequence[str] = TEXT_DOMAINS, *, n: int = 100, seed: int = 0) -> list:
    """A labelled corpus: ``n`` texts of each text domain, domain after domain (``Record.domain`` = name).

    The order is fixed (names in the given order, texts in :func:`domain_texts` order), so shards cut
    from it with :func:`shard_ranges` cover the same items as one pass.
    """
    from .io import Record

    names = list(names)
    if not names:
        raise ConfigError("no domain was given.", hint=f"Name one or more of: {', '.join(TEXT_DOMAINS)}.")
    check_domains(names)
    tok = [d for d in names if d in TOKEN_DOMAINS]
    if tok:
        raise ConfigError(f"domain {tok[0]!r} is token-level (no texts) and cannot be part of a text corpus.",
                          hint=f"Use text domains: {', '.join(TEXT_DOMAINS)} (or hf:NAME:SPLIT).")
    out = []
    for d in names:
        out.extend(Record(text=t, domain=d, line=i + 1) for i, t in enumerate(domain_texts(d, n=n, seed=seed)))
    return out


def shard_ranges(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges of at most ``shard_size`` items covering ``0..n_items``."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size={shard_size!r}; use a positive number of items per shard.")
    return [(a, min(a + shard_size, n_items)) for a in range(0, n_items, shard_size)]
