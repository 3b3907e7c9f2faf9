"""A/A matrices and power of the A/B statistics by simulation, through the functions the report calls.

    python -m service.experiments.simulate --runs 1000 --markdown docs/ab-testing.md

prints the tables and writes them into docs/ab-testing.md between ``<!-- simulate: begin -->`` and
``<!-- simulate: end -->``. Traffic (one run = one experiment):

- ``labels`` labelled requests (2,000 by default; 20,000 in the long runs); the verdict is read
  after every label, and a run counts as a false positive if it was ever anything but
  "no difference yet".
- Arrival of the labels (``ARRIVALS``): "uniform", every label at a uniformly random time (a
  random interleaving); "batched per key", each key's labels arrive together, keys in random
  order (sessions, feedback sent in one batch per user); "staggered joins", each key joins at a
  uniform time and its labels arrive uniformly between then and the end (users joining over
  time: early looks see few users, each with a few labels). With one request per key the three
  are the same random order.
- "1 request per key": every request is its own user. "heavy users": requests per key are
  ceil(lognormal(log 2, 1.5)) (median 2, mean 6.7; the largest of a run's ~300 keys has 80-300
  requests in 80 % of runs), and each key has its own accuracy, Beta with mean ``base`` and concentration
  4 (intra-key correlation 0.2).
- Keys are assigned to A with probability ``share_a``, as the assignment hash does.

The experiment settings are the ``Experiment`` defaults, and the extreme values its validation
allows are checked in their own table. Everything is numpy; a cell of 1,000 runs of 2,000 labels
takes about a second.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .definition import Experiment
from .stats import compare_arms, paired_sequential, sample_ratio

SPLITS = {"50/50": 0.5, "80/20": 0.8, "95/5": 0.95}
SHAPES = ("1 request per key", "heavy users")
ARRIVALS = ("uniform", "batched per key", "staggered joins")
BASES = (0.6, 0.9, 0.98)
ALPHA = 0.05
# the experiment defaults the report uses
MIN_SAMPLES, MIN_KEYS, TAU = (Experiment.model_fields[f].default for f in ("min_samples", "min_keys", "tau"))


def _bound(field: str, kind: str) -> float:
    """The bound ``kind`` ("ge", "gt", "le", "lt") of an Experiment field's validation."""
    return next(getattr(m, kind) for m in Experiment.model_fields[field].metadata if getattr(m, kind, None) is not None)


# the extreme settings the Experiment validation allows
LEAST_SAMPLES, LEAST_KEYS = _bound("min_samples", "ge"), _bound("min_keys", "ge")
TAUS = (_bound("tau", "ge"), _bound("tau", "le"))
CONCENTRATION = 4.0  # per-key accuracy ~ Beta(base c, (1 - base) c)
BEGIN, END = "<!-- simulate: begin -->", "<!-- simulate: end -->"


@dataclass(frozen=True)
class Cell:
    """A/A rate of false verdicts in one cell of a matrix."""

    name: str
    runs: int
    false: int
    looked: int  # runs that reached at least one look (a verdict was possible)

    @property
    def rate(self) -> float:
        return self.false / self.runs

    @property
    def rate_looked(self) -> float:
        """The rate among the runs that reached a look."""
        return self.false / self.looked if self.looked else math.nan

    @property
    def bound(self) -> float:
        """alpha plus two Monte-Carlo standard errors of a rate of alpha over ``runs``."""
        return ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / self.runs)

    @property
    def ok(self) -> bool:
        return self.rate <= self.bound


# ---- traffic ------------------------------------------------------------------------------------------
def users(rng: np.random.Generator, labels: int, shape: str) -> np.ndarray:
    """The key of each of ``labels`` requests (0..K-1), grouped by key."""
    if shape == SHAPES[0]:
        return np.arange(labels)
    if shape != SHAPES[1]:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    counts = np.ceil(rng.lognormal(math.log(2), 1.5, size=labels)).astype(np.int64)
    keys = int(np.searchsorted(np.cumsum(counts), labels)) + 1
    return np.repeat(np.arange(keys), counts[:keys])[:labels]


def key_accuracy(rng: np.random.Generator, keys: int, base: float, shape: str) -> np.ndarray:
    if shape == SHAPES[0]:
        return np.full(keys, base)
    return rng.beta(base * CONCENTRATION, (1 - base) * CONCENTRATION, size=keys)


def arrival_order(rng: np.random.Generator, key: np.ndarray, arrival: str) -> np.ndarray:
    """The order in which the labels of requests with keys ``key`` (grouped by key) arrive."""
    if arrival == ARRIVALS[0]:
        return rng.permutation(len(key))
    keys = int(key[-1]) + 1
    if arrival == ARRIVALS[1]:  # a key's labels together, in their own order
        return np.argsort(rng.random(keys)[key], kind="stable")
    if arrival == ARRIVALS[2]:
        joins = rng.random(keys)[key]
        return np.argsort(joins + (1 - joins) * rng.random(len(key)), kind="stable")
    raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")


def ab_run(rng: np.random.Generator, labels: int, share_a: float, shape: str, base_a: float,
           base_b: float | None = None, arrival: str = ARRIVALS[0]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(in_a, correct, key) of one experiment's labels in arrival order."""
    key = users(rng, labels, shape)
    keys = int(key[-1]) + 1
    arm_a = rng.random(keys) < share_a
    accuracy = np.where(arm_a, key_accuracy(rng, keys, base_a, shape),
                        key_accuracy(rng, keys, base_a if base_b is None else base_b, shape))
    correct = rng.random(labels) < accuracy[key]
    order = arrival_order(rng, key, arrival)
    return arm_a[key][order], correct[order], key[order]


# ---- A/A: arms -------------------------------------------------------------------------------------------
def aa_arms(split: str, shape: str, base: float, runs: int, labels: int = 2000, seed: int = 0,
            min_samples: int = MIN_SAMPLES, min_keys: int = MIN_KEYS, tau: float = TAU,
            arrival: str = ARRIVALS[0]) -> Cell:
    rng = np.random.default_rng([seed, list(SPLITS).index(split), SHAPES.index(shape), int(base * 1000),
                                 ARRIVALS.index(arrival), labels])
    false = looked = 0
    for _ in range(runs):
        c = compare_arms(*ab_run(rng, labels, SPLITS[split], shape, base, arrival=arrival), ALPHA, min_samples,
                         min_keys, tau)
        looked += c is not None
        false += c is not None and c.decision != "no difference yet"
    users_ = shape if shape == SHAPES[0] else f"{shape}, {arrival}"
    settings = "" if (min_samples, min_keys, tau) == (MIN_SAMPLES, MIN_KEYS, TAU) else (
        f", min_samples {min_samples}, min_keys {min_keys}, tau {tau}")
    return Cell(f"{split}, {users_}, accuracy {base}{settings}", runs, false, looked)


# ---- A/A: paired -------------------------------------------------------------------------------------------
def discordant_pairs(rng: np.random.Generator, labels: int, shape: str, base: float,
                     interaction: float = 0.0, arrival: str = ARRIVALS[0]) -> tuple[np.ndarray, np.ndarray]:
    """(primary_right, key) of the discordant pairs among ``labels`` labelled requests that both
    models saw, in arrival order. The models are equally accurate on every key: a request is
    discordant with probability min(p_k, 1 - p_k) (half the most two models of accuracy p_k can
    disagree) and the primary wins it with probability 1/2. ``interaction`` > 0: on each key one
    model (a coin flip) wins with probability 1/2 + interaction, so the two are equally good on
    average only."""
    key = users(rng, labels, shape)
    keys = int(key[-1]) + 1
    p = key_accuracy(rng, keys, base, shape)
    win = 0.5 + interaction * np.where(rng.random(keys) < 0.5, 1, -1)
    key = key[arrival_order(rng, key, arrival)]
    pair = key[rng.random(labels) < np.minimum(p, 1 - p)[key]]
    return rng.random(len(pair)) < win[pair], pair


def aa_paired(shape: str, base: float, runs: int, labels: int = 2000, seed: int = 0, interaction: float = 0.0,
              keyed: bool = False, arrival: str = ARRIVALS[0]) -> Cell:
    """A/A of ``paired_sequential``: exact (pairs only) or, with ``keyed``, clustered by key."""
    rng = np.random.default_rng([seed, 7, SHAPES.index(shape), int(base * 1000), int(interaction * 100),
                                 ARRIVALS.index(arrival)])
    false = looked = 0
    for _ in range(runs):
        right, key = discordant_pairs(rng, labels, shape, base, interaction, arrival)
        verdict = paired_sequential(right, ALPHA, key if keyed else None)
        looked += verdict.confidence_sequence is not None or verdict.decision != "no difference yet"
        false += verdict.decision != "no difference yet"
    users_ = shape if shape == SHAPES[0] else f"{shape}, {arrival}"
    label = (f"{'keyed' if keyed else 'exact'}, {users_}, accuracy {base}"
             + (f", {labels:,} labels" if labels != 2000 else "")
             + (f", user x model interaction ±{interaction}" if interaction else ""))
    return Cell(label, runs, false, looked)


# ---- A/A: sample ratio --------------------------------------------------------------------------------------
def aa_sample_ratio(split: str, keys: int, runs: int, seed: int = 0) -> Cell:
    rng = np.random.default_rng([seed, 11, list(SPLITS).index(split), keys])
    share = SPLITS[split]
    false = sum(sample_ratio((rng.random(keys) >= share).astype(np.int64), [share, 1 - share], ALPHA).mismatch
                for _ in range(runs))
    return Cell(f"{split}, {keys:,} keys", runs, int(false), runs)


# ---- power ------------------------------------------------------------------------------------------------
POWER_GRID = {SHAPES[0]: (2_500, 5_000, 7_500, 10_000, 15_000, 20_000, 40_000),
              SHAPES[1]: (20_000, 40_000, 80_000, 120_000, 160_000, 240_000)}


def power(shape: str, labels: int, runs: int, base_a: float = 0.90, base_b: float = 0.88, seed: int = 0) -> tuple[float, float]:
    """(share of runs whose verdict said "A better", share that said "B better") by the end of an
    experiment of ``labels`` labelled requests, 50/50, read after every label."""
    rng = np.random.default_rng([seed, 13, SHAPES.index(shape), labels])
    decisions = [compare_arms(*ab_run(rng, labels, 0.5, shape, base_a, base_b), ALPHA, MIN_SAMPLES, MIN_KEYS, TAU)
                 for _ in range(runs)]
    right = sum(c is not None and c.decision == "A better" for c in decisions)
    wrong = sum(c is not None and c.decision == "B better" for c in decisions)
    return right / runs, wrong / runs


def labels_for(target: float, grid: tuple[int, ...], powers: list[float]) -> float:
    """Labelled requests for ``target`` power: log-linear between the grid points around it."""
    for (n0, p0), (n1, p1) in zip(zip(grid, powers), zip(grid[1:], powers[1:])):
        if p0 < target <= p1:
            return math.exp(math.log(n0) + (target - p0) / (p1 - p0) * (math.log(n1) - math.log(n0)))
    return grid[0] if powers[0] >= target else math.inf


def srm_keys_to_mismatch(runs: int, keys: int, lost: float = 0.1, seed: int = 0) -> np.ndarray:
    """Keys until the SRM check flags a 50/50 experiment whose arm B loses ``lost`` of its keys."""
    rng = np.random.default_rng([seed, 17])
    share = 0.5 * (1 - lost) / (1 - 0.5 * lost)  # B's share of the keys that remain
    first = np.full(runs, np.inf)
    for r in range(runs):
        arms = (rng.random(keys) < share).astype(np.int64)
        # the smallest prefix with a mismatch: bisection on the (monotone) running p-value
        lo, hi = 0, keys
        if not sample_ratio(arms, [0.5, 0.5], ALPHA).mismatch:
            continue
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if sample_ratio(arms[:mid], [0.5, 0.5], ALPHA).mismatch else (mid, hi)
        first[r] = hi
    return first


def quantile(first: np.ndarray, q: float) -> float:
    """The q-quantile of a first-hit time, inf if fewer than q of the runs hit."""
    return float(np.quantile(first, q)) if np.mean(np.isfinite(first)) >= q else math.inf


# ---- the tables ----------------------------------------------------------------------------------------------
def _rows(cells: list[Cell], head: str) -> list[str]:
    lines = [f"| {head} | runs | runs with a look | false verdicts | rate | rate among runs with a look "
             "| bound α + 2 MC s.e. | |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in cells:
        lines.append(f"| {c.name} | {c.runs:,} | {c.looked:,} | {c.false} | {c.rate:.3f} | {c.rate_looked:.3f} | "
                     f"{c.bound:.4f} | {'ok' if c.ok else '**FAIL**'} |")
    return lines


def _fmt(n: float) -> str:
    return "never" if math.isinf(n) else f"{n:,.0f}"


Progress = Callable[[str], None]


# the users and arrivals of the matrix: with one request per key every arrival is the same random order
USERS = [(SHAPES[0], ARRIVALS[0])] + [(SHAPES[1], arrival) for arrival in ARRIVALS]


def arms_tables(runs: int, labels: int, progress: Progress) -> tuple[list[str], list[Cell]]:
    cells = []
    for split in SPLITS:
        for shape, arrival in USERS:
            for base in BASES:
                cells.append(aa_arms(split, shape, base, runs, labels, arrival=arrival))
                progress(cells[-1].name)
    out = [f"**Arms, A/A** ({labels:,} labelled requests a run, a look after every label, min_samples "
           f"{MIN_SAMPLES}, min_keys {MIN_KEYS}, tau {TAU}, alpha {ALPHA}):", "",
           *_rows(cells, "split, users, arrival, accuracy")]
    long = [aa_arms(split, SHAPES[1], 0.9, runs, 10 * labels, arrival=arrival) for split in SPLITS for arrival in ARRIVALS]
    progress("long runs")
    out += ["", f"**Arms, A/A, long runs** ({10 * labels:,} labelled requests a run, heavy users, accuracy 0.9):", "",
            *_rows(long, "split, users, arrival, accuracy")]
    extreme = [aa_arms(split, SHAPES[1], base, runs, labels, min_samples=LEAST_SAMPLES, min_keys=LEAST_KEYS, tau=tau,
                       arrival=arrival)
               for tau in TAUS for split in ("80/20", "95/5") for arrival in ARRIVALS for base in (0.6, 0.9)]
    progress("extreme settings")
    out += ["", f"**Arms, A/A, the extreme settings the definition allows** ({labels:,} labelled requests a run, "
            f"min_samples {LEAST_SAMPLES}, min_keys {LEAST_KEYS}, tau {TAUS[0]} and {TAUS[1]}):", "",
            *_rows(extreme, "split, users, arrival, accuracy, settings")]
    return out, cells + long + extreme


def paired_table(runs: int, labels: int, progress: Progress) -> tuple[list[str], list[Cell]]:
    cells = [aa_paired(shape, base, runs, labels) for shape in SHAPES for base in BASES]
    cells += [aa_paired(shape, base, runs, labels, interaction=0.2, keyed=True, arrival=arrival)
              for shape, arrival in USERS for base in BASES]
    cells += [aa_paired(SHAPES[1], base, runs, 10 * labels, interaction=0.2, keyed=True, arrival=arrival)
              for arrival in ARRIVALS for base in (0.6, 0.9)]
    progress("paired")
    return ["", f"**Paired (shadow), A/A** ({labels:,} labelled requests a run, a discordant pair with probability "
            "min(p, 1 - p) for a key of accuracy p; exact: the models are equally accurate on every key, so pairs are "
            "independent fair coins whatever their order; keyed (the test the report uses): "
            "each key's pairs fall 0.7/0.3 one way or the other, equally often, and the pairs' keys are given):", "",
            *_rows(cells, "test, users, arrival, accuracy")], cells


def sample_ratio_table(runs: int, progress: Progress) -> tuple[list[str], list[Cell]]:
    cells = [aa_sample_ratio(split, keys, runs) for split in SPLITS for keys in (300, 2_000, 20_000)]
    progress("srm")
    return ["", "**Sample ratio, A/A** (keys assigned with the configured weights, a look after every new key):", "",
            *_rows(cells, "split, keys")], cells


def power_table(power_runs: int, progress: Progress) -> list[str]:
    out = ["", f"**Power** of the arms' verdict for 0.90 against 0.88, 50/50 ({power_runs:,} runs a point): share of "
           "experiments of N labelled requests (both arms together, read after every label) whose verdict said "
           "\"A better\" by the end, and N for 50 % and 80 % power (log-linear between grid points). No run said "
           "\"B better\" unless the table says so.", "",
           "| users | N: power | N for 50 % | N for 80 % |", "|---|---|---:|---:|"]
    for shape, grid in POWER_GRID.items():
        results = [power(shape, n, power_runs) for n in grid]
        curve = ", ".join(f"{n:,}: {right:.2f}" + (f" (B better {wrong:.3f})" if wrong else "")
                          for n, (right, wrong) in zip(grid, results))
        powers = [right for right, _ in results]
        out.append(f"| {shape} | {curve} | {_fmt(labels_for(0.5, grid, powers))} | {_fmt(labels_for(0.8, grid, powers))} |")
        progress(f"power {shape}")
    return out


def limits_and_srm_power(runs: int, labels: int, progress: Progress) -> list[str]:
    interaction = aa_paired(SHAPES[1], 0.9, runs, labels, interaction=0.2)
    progress("interaction")
    srm_first = srm_keys_to_mismatch(runs, 20_000)
    return ["", "Outside the guarantee, measured: the exact paired test (no keys) when one model is better for some "
            "users and worse for others (heavy users, accuracy 0.9, each key's pairs 0.7/0.3 one way or the other): "
            f"false verdicts {interaction.false} of {interaction.runs} ({interaction.rate:.3f}).",
            "", f"SRM power: a 50/50 experiment whose arm B loses 10 % of its keys is flagged after "
            f"{_fmt(quantile(srm_first, 0.5))} keys in half the runs, {_fmt(quantile(srm_first, 0.8))} in 80 %."]


def tables(runs: int, labels: int, power_runs: int, progress: Progress = lambda s: None) -> tuple[list[str], bool]:
    """The markdown of every table, and whether every A/A cell is within its bound."""
    arms, arm_cells = arms_tables(runs, labels, progress)
    paired, paired_cells = paired_table(runs, labels, progress)
    srm, srm_cells = sample_ratio_table(runs, progress)
    ok = all(c.ok for c in arm_cells + paired_cells + srm_cells)
    return arms + paired + srm + power_table(power_runs, progress) + limits_and_srm_power(runs, labels, progress), ok


def write_block(path: Path, lines: list[str]) -> None:
    text = path.read_text()
    block = "\n".join([BEGIN, *lines, END])
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs per A/A cell (>= 1000 for the bound to mean much)")
    parser.add_argument("--labels", type=int, default=2000, help="labelled requests per A/A run")
    parser.add_argument("--power-runs", type=int, default=500, help="runs per point of the power curves")
    parser.add_argument("--markdown", type=Path, help="write the tables into this file's generated block")
    args = parser.parse_args(argv)
    started = time.monotonic()
    lines, ok = tables(args.runs, args.labels, args.power_runs,
                       progress=lambda s: print(f"  {s}: {time.monotonic() - started:.0f} s", file=sys.stderr))
    command = " ".join(["python -m service.experiments.simulate", *(argv if argv is not None else sys.argv[1:])])
    lines += ["", f"Generated by `{command}` in {time.monotonic() - started:.0f} s (one core of a shared 2-core machine)."]
    print("\n".join(lines))
    if args.markdown:
        write_block(args.markdown, lines)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
