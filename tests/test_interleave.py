"""A seeded, randomized interleaving of the application and the tool on a real server (issue 9):
the application inserts duplicates, deletes rows (survivors too), changes keys, updates other
columns, holds row locks longer than `--lock-timeout` and takes the documented advisory lock in
a find-or-create path, while `run --apply` processes run, are killed (-9), stopped (SIGTERM),
resumed (`--run-id`) and undone.

After every step the invariants of tests/interleave_support.py are checked on the data: audit
equals the tool's writes, the tool wrote only keys, no application write is lost, untouched
survivors keep their value, no value vanishes under a batch, every group is resolved or
recorded as skipped and retried by a resume; each scenario ends with a byte-exact undo and a
final run that leaves no duplicate.

Seeds: `make test` runs fixed seeds for about BULKDEDUPE_SOAK_SECONDS (35) seconds;
`make soak MINUTES=N` runs fresh seeds for N minutes; BULKDEDUPE_SOAK_SEED=S replays seed S
(its choices replay; the timing of the tool's processes may differ).
"""

from __future__ import annotations

import os
import random
import time
import traceback
from pathlib import Path

import pytest

from tests.interleave_support import Scenario, StepFailed

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SEED_ENV = "BULKDEDUPE_SOAK_SEED"
SECONDS_ENV = "BULKDEDUPE_SOAK_SECONDS"
FRESH_ENV = "BULKDEDUPE_SOAK_FRESH_SEEDS"
KEEP_GOING_ENV = "BULKDEDUPE_SOAK_KEEP_GOING"  # 1: go on after a problem, list them all
DEFAULT_SECONDS = 35.0
FIRST_SEED = 1
SCENARIO_SECONDS = 20.0  # steps of one scenario; its final runs come on top
MAX_SCENARIOS = 10_000


def seeds() -> tuple[list[int] | None, float]:
    """The seeds to run (None: as many as the time allows) and the time budget."""
    if replay := os.environ.get(SEED_ENV):
        return [int(replay)], float("inf")
    return None, float(os.environ.get(SECONDS_ENV, DEFAULT_SECONDS))


def report(seed: int, scenario: Scenario, exc: BaseException, tmp_path: Path) -> str:
    what = str(exc) if isinstance(exc, StepFailed) else "".join(traceback.format_exception(exc))
    steps = "\n".join(f"    {s}" for s in scenario.steps)
    return (
        f"interleaving scenario failed: seed {seed}\n"
        f"  replay: {SEED_ENV}={seed} .venv/bin/pytest tests/test_interleave.py -q\n"
        f"  tool output: {tmp_path}/s{seed}-*.out|err\n"
        f"  after step {len(scenario.steps) - 1}:\n    "
        + what.replace("\n", "\n    ")
        + f"\n  steps:\n{steps}"
    )


async def test_randomized_interleaving_of_app_and_tool(dsn: str, tmp_path: Path) -> None:
    fixed, budget = seeds()
    fresh = os.environ.get(FRESH_ENV) == "1"
    keep_going = os.environ.get(KEEP_GOING_ENV) == "1"
    rng = random.SystemRandom()
    started = time.monotonic()
    failures: dict[int, str] = {}  # seed -> report
    passed = 0
    for n in range(MAX_SCENARIOS if fixed is None else len(fixed)):
        elapsed = time.monotonic() - started
        if fixed is None and n and elapsed + 10 > budget:  # it could not end within the budget
            break
        seed = fixed[n] if fixed is not None else rng.randrange(2**31) if fresh else FIRST_SEED + n
        cap = min(SCENARIO_SECONDS, max(budget - elapsed - 8, 5))
        scenario = Scenario(seed, dsn, tmp_path, cap, keep_going=keep_going)
        t0 = time.monotonic()
        try:
            await scenario.execute()
        except Exception as exc:  # any failure is reported with its seed and steps
            failures[seed] = report(seed, scenario, exc, tmp_path)
            print(f"\nFAILED seed {seed}: replay with {SEED_ENV}={seed}", flush=True)
            print(failures[seed], flush=True)
        else:
            passed += 1
            took = time.monotonic() - t0
            print(f"seed {seed} ok: {len(scenario.steps)} steps, {took:.1f}s", flush=True)
    assert passed or failures
    first = next(iter(failures.values()), "")
    assert not failures, f"{len(failures)} of {passed + len(failures)} seeds failed: " + (
        ", ".join(map(str, failures)) + f"\n\n{first}"
    )
