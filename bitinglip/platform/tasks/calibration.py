"""Automatic choices decided by timing on the worker that runs them.

A CPU flag says that an instruction exists, not that it is fast here: on a
2-core Xeon that lists ``avx512_bf16`` (no AMX) the bfloat16 products of the
embed task ran 1.7x slower than float32, while on a Zen 4 and on an AMX Xeon
they ran about 2x faster.  So ``matmul_precision="auto"`` is decided by
running the model's own micro-batch through each candidate when the model
loads (a second or two), keeping the fastest candidate whose output stays
within the parity bound of the exact one.

The verdict is kept on disk, keyed by what it depends on (the CPU's model
name and flags, the threads torch uses, torch's version, the model's
weights and the candidates), so a restarted worker does not time again.
A cache entry is one small JSON file written atomically; an unreadable one
is timed again, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitinglip.atomic import write_json_atomically

log = logging.getLogger(__name__)
#: the lowest cosine between a candidate's vectors and the exact ones (per row) that still counts as the same
#: result: what the embed task promises for its bfloat16 products (see encoders' docstring)
PARITY_COSINE = 0.9999
#: timed runs per candidate after one warm-up run; the fastest run counts (the others met a busy machine)
REPEATS = 3
#: a candidate already this many times slower than the best is not timed again (a bfloat16 product that a CPU
#: emulates runs 8x slower than float32: timing it three more times would only lengthen the load)
DROP_RATIO = 2.0
#: an inexact candidate must beat the exact one by this share to be chosen: a near tie keeps exact arithmetic
#: (and the same choice on every worker), at a cost of at most this much speed
MARGIN = 0.05
#: bump when the timing method changes, so old verdicts are not reused
VERSION = 2

Timer = Callable[[], float]


@dataclass(frozen=True)
class Choice:
    """One automatic choice: what was chosen, from where, and the figures behind it."""

    value: str
    source: str  # "measured", "cached", "requested" (an explicit value), or "only candidate"
    seconds: Mapping[str, float] = field(default_factory=dict)  # candidate -> best seconds of one run
    min_cosine: Mapping[str, float] = field(default_factory=dict)  # candidate -> lowest cosine to the exact one
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}


@functools.lru_cache(maxsize=1)
def cpu_identity() -> str:
    """The CPU's model name and flags (Linux), else what ``platform`` says."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                if name and flags:
                    break
    except OSError:
        pass
    return f"{name}|{flags}"


def cpu_name() -> str:
    return cpu_identity().split("|", 1)[0]


def weights_identity(path: str | os.PathLike[str]) -> str:
    """The model folder's weights and config, by name, size and mtime (a registered model's sha256 is
    better and is used when the caller has it)."""
    root = Path(path)
    parts = []
    for item in sorted(root.glob("*")):
        if item.is_file() and item.suffix in (".safetensors", ".bin", ".json"):
            st = item.stat()
            parts.append(f"{item.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("\n".join([str(root.resolve()), *parts]).encode()).hexdigest()


def cache_key(what: str, model: str, candidates: tuple[str, ...], shape: str) -> str:
    import torch

    text = "\n".join([str(VERSION), what, cpu_identity(), f"threads={torch.get_num_threads()}",
                      f"torch={torch.__version__}", model, ",".join(candidates), shape])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read(path: Path) -> Choice | None:
    try:
        data = json.loads(path.read_text())
        return Choice(str(data["value"]), "cached", dict(data.get("seconds") or {}),
                      dict(data.get("min_cosine") or {}), str(data.get("reason") or ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fastest(run: Callable[[str], Any], candidates: tuple[str, ...], exact: str,
            agree: Callable[[Any, Any], float] | None, *, cache: Path | None = None, timer: Timer = time.perf_counter,
            repeats: int = REPEATS, parity: float = PARITY_COSINE, floor_s: float = 0.0,
            work: Mapping[str, float] | None = None) -> Choice:
    """The fastest of ``candidates`` whose output agrees with ``exact``'s.

    ``run(candidate)`` runs one micro-batch and returns its output;
    ``agree(out, exact_out)`` is the lowest per-row cosine between them (None:
    every candidate gives the same result, nothing is compared).  ``work``:
    what one run of each candidate does (its tokens, say) where candidates do
    different amounts; they are then compared by seconds per unit of work.
    Candidates run interleaved (a, b, a, b, ...) so that a machine that grows
    busy mid-way slows each alike; each one's fastest run counts.  With
    ``cache`` (a file path), a verdict found there is returned as is and a new
    one is written there.  ``exact`` is the candidate kept on a near tie."""
    with _exclusive(cache):  # the workers of one machine start together: one times, the others read its verdict
        if cache is not None and cache.exists():
            cached = _read(cache)
            if cached is not None and cached.value in candidates:
                return cached
        return _measure(run, candidates, exact, agree, cache, timer, repeats, parity, floor_s, work)


@contextmanager
def _exclusive(cache: Path | None) -> Iterator[None]:
    """Hold a lock beside ``cache`` for the block (released when the process dies, so never stale).  Without
    it the two workers of ``make demo`` timed the same model at the same time, each on a core the other was
    loading on (a budget that takes 0.5 s alone took 8.8 s), and both paid for it."""
    if cache is None:
        yield
        return
    try:
        import fcntl

        cache.parent.mkdir(parents=True, exist_ok=True)
        handle = open(cache.with_suffix(".lock"), "a")  # noqa: SIM115 - closed below, which drops the lock
    except (ImportError, OSError):  # no flock (not Linux), a read-only folder: time unlocked
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _measure(run: Callable[[str], Any], candidates: tuple[str, ...], exact: str,
             agree: Callable[[Any, Any], float] | None, cache: Path | None, timer: Timer, repeats: int,
             parity: float, floor_s: float, work: Mapping[str, float] | None) -> Choice:
    best: dict[str, float] = {}
    outputs = {}
    for c in candidates:  # the warm-up, and the outputs the parity check compares
        start = timer()
        outputs[c] = run(c)
        best[c] = timer() - start
    if best[exact] < floor_s:  # a micro-batch this cheap is all overhead: timing it would pick by noise
        return Choice(exact, "measured", best, {}, f"the model's micro-batch takes {best[exact] * 1e3:.1f} ms, "
                      f"under {floor_s * 1e3:.0f} ms: too small for its precision to matter; the exact one is kept")

    def cost(c: str) -> float:  # seconds per unit of work
        return best[c] / (work[c] if work else 1.0)

    for _ in range(repeats):
        for c in candidates:
            if cost(c) > DROP_RATIO * min(map(cost, candidates)):
                continue  # clearly slower, even against a cold run: not worth more of the load's time
            start = timer()
            run(c)
            best[c] = min(best[c], timer() - start)
    cosine = {c: 1.0 if c == exact or agree is None else float(agree(outputs[c], outputs[exact]))
              for c in candidates}
    within = [c for c in candidates if cosine[c] >= parity]
    value = min(within, key=lambda c: (cost(c) if c == exact else cost(c) / (1 - MARGIN), c != exact))
    others = ", ".join(f"{c} {best[c] * 1e3:.1f} ms" + (f" ({work[c] / best[c]:.0f}/s)" if work else "")
                       + ("" if c in within else f" (cosine {cosine[c]:.6f}: out)") for c in candidates)
    bound = "" if agree is None else f" within cosine {parity}"
    choice = Choice(value, "measured", best, {} if agree is None else cosine, f"fastest{bound}: {others}")
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(cache, {**choice.as_dict(), "cpu": cpu_name()})
        except OSError as exc:  # a read-only cache: time again next start, nothing worse
            log.warning("could not keep the calibration in %s: %s", cache, exc)
    return choice
