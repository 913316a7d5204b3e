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

Two table shapes, one test each, and the seed's parity says which: odd seeds the plain,
unscoped payments(id PRIMARY KEY); even seeds payments(id, merchant_id NOT NULL, ...,
PRIMARY KEY (id, merchant_id)) run with `--scope merchant_id` and that composite key by
default, where duplicates are per merchant, the application's find-or-create takes the scoped
advisory lock, its key changes may also move a row to another merchant, and the audit names
rows by the JSON text of their primary key.

Seeds: `make test` runs fixed seeds for about BULKDEDUPE_SOAK_SECONDS (35) seconds, half for
each shape; `make soak MINUTES=N` runs fresh seeds for N minutes; BULKDEDUPE_SOAK_SEED=S
replays seed S on its shape (its choices replay; the timing of the tool's processes may
differ).
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
DEFAULT_SECONDS = 35.0  # for both shapes together
SHAPES = ("plain", "scoped")  # the shape of seed S: SHAPES[(S + 1) % 2], odd seeds plain
SCENARIO_SECONDS = 20.0  # steps of one scenario; its final runs come on top
MAX_SCENARIOS = 10_000


def shape_of(seed: int) -> str:
    return SHAPES[(seed + 1) % 2]


def seeds(shape: str) -> tuple[list[int] | None, float]:
    """This shape's seeds to run (None: as many as the time allows) and its time budget."""
    if replay := os.environ.get(SEED_ENV):
        if shape_of(int(replay)) != shape:
            pytest.skip(f"seed {replay} is a {shape_of(int(replay))} seed")
        return [int(replay)], float("inf")
    return None, float(os.environ.get(SECONDS_ENV, DEFAULT_SECONDS)) / len(SHAPES)


def report(seed: int, scenario: Scenario, exc: BaseException, tmp_path: Path) -> str:
    what = str(exc) if isinstance(exc, StepFailed) else "".join(traceback.format_exception(exc))
    steps = "\n".join(f"    {s}" for s in scenario.steps)
    return (
        f"interleaving scenario failed: seed {seed}, shape {scenario.shape.describe()}\n"
        f"  replay: {SEED_ENV}={seed} .venv/bin/pytest tests/test_interleave.py -q\n"
        f"  tool output: {tmp_path}/s{seed}-*.out|err\n"
        f"  after step {len(scenario.steps) - 1}:\n    "
        + what.replace("\n", "\n    ")
        + f"\n  steps:\n{steps}"
    )


@pytest.mark.parametrize("shape", SHAPES)
async def test_randomized_interleaving_of_app_and_tool(
    dsn: str, tmp_path: Path, shape: str
) -> None:
    fixed, budget = seeds(shape)
    parity = SHAPES.index(shape)  # plain: odd seeds, scoped: even
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
        if fixed is not None:
            seed = fixed[n]
        else:  # plain 1, 3, 5, ...; scoped 2, 4, 6, ...; fresh ones of the same parity
            seed = 2 * (rng.randrange(2**30) if fresh else n) + 1 + parity
        assert shape_of(seed) == shape
        cap = min(SCENARIO_SECONDS, max(budget - elapsed - 8, 5))
        scenario = Scenario(seed, dsn, tmp_path, cap, keep_going=keep_going, shape_name=shape)
        t0 = time.monotonic()
        try:
            await scenario.execute()
        except Exception as exc:  # any failure is reported with its seed and steps
            failures[seed] = report(seed, scenario, exc, tmp_path)
            print(f"\nFAILED seed {seed} ({shape}): replay with {SEED_ENV}={seed}", flush=True)
            print(failures[seed], flush=True)
        else:
            passed += 1
            took = time.monotonic() - t0
            print(f"seed {seed} ok ({shape}): {len(scenario.steps)} steps, {took:.1f}s", flush=True)
    assert passed or failures
    first = next(iter(failures.values()), "")
    assert not failures, f"{len(failures)} of {passed + len(failures)} {shape} seeds failed: " + (
        ", ".join(map(str, failures)) + f"\n\n{first}"
    )
