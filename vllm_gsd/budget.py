"""How much of each drafted tree to verify: the adaptive graph budget.

A tree node is worth verifying when the tokens it is expected to add outweigh
the time it costs. Both sides move with the hardware and the batch: one H100
pass over 256 tokens costs about what a pass over 1 costs, a 2-core CPU pays
for every token past a handful, and a large batch leaves no spare compute on
either. So both are measured while serving, and every step picks the node
set that maximises expected tokens per second (Sequoia, arXiv 2402.12374,
sizes its trees on the same trade-off, from offline measurements).

Expected tokens. A node is accepted exactly when the target agrees with its
whole path, so the expected accepted length of a tree is the sum over its
nodes of P(node accepted). The draft's path probability p estimates that
probability; `AcceptanceCalibration` corrects it per depth (and separately
for greedy and sampled requests, and for context-lookup nodes, below) with
the running ratio accepted nodes / sum of p over verified nodes at that
depth.

Cost. `StepCostModel` fits the measured time of a decode step, linear in
the step's target tokens, its requests verified with a tree (the tree
path's per-request work: positions, replay planning, the acceptance walk),
its replayed branches, its replay waves (kernel calls) and whether it has
a tree at all (the batch leaves vLLM's decode path). A shared CPU
drifts through slow and fast phases (at batch 1, means over 20 plain steps
moved between 37 and 54 ms within one run) far larger than what a tree node
costs (2-5 ms), and a step is as slow as its neighbours (lag-1 correlation
0.65). So the shape's costs are fitted, by recursive least squares with
forgetting and clipped residuals, to the differences between consecutive
decode steps of different shapes, where the phase cancels; the level they
stand on is the median over the last 16 steps. Fitted to the times
themselves, the trees' cost took the blame for whatever phase the plain
steps were not measured in: one run went from pricing a one-node tree at
+1 ms to +15 ms beside paired differences of +4 to +7 ms, and stopped
drafting. A tree's extra time over the step without it is priced one
standard error high, and never below zero (`StepCostModel.step_ms_each`):
where plain steps are rare, that difference is measured rarely, and a noisy
fit can call a tree free. The draft's time per step is
measured per batch size (see below), and the time between steps
(scheduler, output processing) is a running mean.

Choice. Nodes enter in order of calibrated value, a node only after its
parent (so every prefix of the order is a valid set of trees); for every
prefix length k the predicted rate is
    (requests + expected accepted nodes of the first k) / predicted step time,
and the best k wins, k = 0 (no tree at all) included. The same order
restricted to each request's first branch (chains, which need no replay
wave) competes too: where a wave is dear, a second chain node can pay where
a more valuable sibling does not.

Draft depth. Every draft level costs a pass of the draft model, so a
shallow draft may pay where a deep one does not (on an AVX2 CPU in
float32 a draft pass is about 4 ms beside a 55 ms target step, and a
one-node chain pays 1.15x where whole depth-2 trees pay nothing). So for
each depth d up to the one drafted, the best prefix of the nodes no deeper
than d, with the time of drafting d levels added, over plain decoding's
rate, is a gain, averaged per depth over recent steps (one step's tree
says little about the next one's; a step of many trees says more, and
weighs more: `gain_decay`). The next steps draft the depth of the
best gain; every `probe_interval` steps they draft all levels, so the
deeper gains stay current. While no gain is above 1 the steps do not
draft at all, except a probe (all levels) every `probe_interval` steps;
each probe that finds drafting not paying (in a small batch, clearly
not: a gain under CLOSE_CALL_GAIN) doubles the interval (up to
MAX_PROBE_INTERVAL), and a probe weighs at least as much in the
averages as a drafting step does. Such a probe, like the first step at
a batch size, drafts a random sample of the batch (PROBE_REQUESTS),
whose nodes stand for the batch's: drafting them all would first catch up on every request's
tokens since it was last drafted, most of a probe's cost in a large
batch. A probe's catch-up is no measure of the draft's time, so in a
batch of at most PROBE_REQUESTS the step after a probe drafts too, in
the steady state: its draft time replaces those of the last steps that
drafted (else a slow spell that stopped drafting would be priced for
good), and its gains, priced with it, weigh as a probe's. Measuring
steps (probes, and the all-levels steps) also
verify the path to their most valuable deepest node: acceptance and tree
costs are learned only from verified nodes. While drafting pays, plain
steps are measured too, every `probe_interval` steps where the gain is
close to 1 (PLAIN_CHECK_BELOW_GAIN): the gains are relative to them.
The gains and the probe interval are kept per batch size (power-of-two
buckets of decoding requests), since a larger batch leaves less spare
compute for trees. Every other step of the first `warmup_steps`
drafts all levels (the rest draft nothing), and its trees are cut at all,
a quarter, half or three quarters of their nodes in turn, so the cost
model has measured steps of every size before it decides. From whole trees
alone, whose shapes barely vary, it cannot tell the cost of a plain step
(seen at batch 16: 1 ms predicted for a 40 ms step, so drafting looked ten
times too costly) or of a small tree (seen at batch 1: a one-node tree
predicted at 65 ms, a whole one at 51 ms, so no tree in between was ever
chosen). The draft's time per level is the median of the last
`DRAFT_TIME_WINDOW` steady-state draft steps at the batch size
(`GraphBudget.observe_draft`): the catch-up after a pause in drafting is a
one-off, not what continuing to draft costs, and a median shrugs off the
first passes at a new shape (allocations, kernel set-up: 27 and 39 ms seen
among 6 ms steps).

Context lookup. A greedy request's tree may also hold a path copied from
its own context (`vllm_gsd.lookup`). Its nodes need no draft pass: they
are offered in undrafted steps too, alone, and count as drafting no level.
Their value is their own running acceptance per depth (a calibration kind
of its own), and the gain of drafting is relative to what the step gets
without drafting: the lookup paths alone where there are any, else plain
decoding. The search is not free (at batch 16 on the CPU the proposer
takes 0.5-0.65 ms of a 50 ms step to search 16 contexts and weigh the paths
found), so its measured time is charged to the lookup paths' rate.
Whether an undrafted step searches at all is measured rather than
predicted: at batch 16 the cost model priced a one-node tree at 0.4-0.9 ms
where consecutive steps differed by 1.6 ms, so it kept searching where
searching lost 4 % (steps alternating between searching and not gave
3.35 against 3.22 ms per token). Undrafted steps that follow each other
are paired, one that searched with one that did not (the same requests,
no prompt tokens between them), and each batch size keeps a running mean
of their log rate ratio: tokens over the wall time from one proposal to
the next, which holds the search, the gap and the next target step with
its lookup trees. A phase of the machine moves both steps of a pair
alike. The first undrafted steps at a batch size alternate until
LOOKUP_TRIAL_PAIRS pairs are in; then they search while the mean says it
pays, and every `probe_interval`-th one does the opposite, a trial paired
with both its neighbours.
Every request's token counts in a step's rate, whether or not it offers
a tree.

Greedy output never depends on the budget (verification is exact). For
sampled requests the budget changes which random numbers land on which
token, which is still exact in distribution but would make a seeded
request depend on timing; such requests are "pinned": always drafted to
the full depth, with their full trees.

Pure NumPy; imports nothing from vLLM.
"""

from __future__ import annotations

import heapq
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vllm_gsd.graph import FlatTree
from vllm_gsd.lookup import MATCH_LENGTH_BUCKETS


class RecursiveLeastSquares:
    """y ≈ w·x, refitted after every observation; old ones fade by
    `forgetting` per observation (0.99: a window of about 100).

    Robust: once `ROBUST_AFTER` observations are in, a residual is clipped
    to `RESIDUAL_CLIP` times the running mean absolute residual, so a rare
    slow step (the first at a new shape pays its kernels' set-up: 57 to
    89 ms seen beside 33 to 50 ms steps) moves the fit no more than an
    ordinary one.
    """

    ROBUST_AFTER = 8
    RESIDUAL_CLIP = 3.0

    def __init__(self, num_features: int, forgetting: float,
                 prior_weights: np.ndarray, prior_variance: float):
        self.weights = np.asarray(prior_weights, dtype=np.float64).copy()
        self.covariance = np.eye(num_features) * prior_variance
        self._max_trace = num_features * prior_variance
        self.forgetting = forgetting
        self.num_observations = 0
        self._abs_residuals = 0.0  # forgetting-weighted sum, and its weight:
        self._residual_weight = 0.0

    @property
    def mean_abs_residual(self) -> float:
        return self._abs_residuals / max(self._residual_weight, 1e-12)

    def predict(self, x: np.ndarray) -> float:
        return float(self.weights @ x)

    def standard_errors(self, xs: np.ndarray) -> np.ndarray:
        """One standard error of the prediction w·x for each row of xs
        [n, d]: the residuals' scale (from their mean absolute value, as for
        normal noise) times sqrt(x' P x)."""
        scale = self.mean_abs_residual * np.sqrt(np.pi / 2)
        spread = np.einsum("ij,jk,ik->i", xs, self.covariance, xs)
        return scale * np.sqrt(np.maximum(spread, 0.0))

    def update(self, x: np.ndarray, y: float) -> None:
        x = np.asarray(x, dtype=np.float64)
        residual = y - self.weights @ x
        if self.num_observations >= self.ROBUST_AFTER:
            bound = self.RESIDUAL_CLIP * self.mean_abs_residual
            residual = min(max(residual, -bound), bound)
        # The scale from clipped residuals (an outlier cannot widen it), once
        # the first observations have placed the fit near its data.
        if self.num_observations >= self.ROBUST_AFTER // 2:
            self._abs_residuals = self.forgetting * self._abs_residuals + abs(residual)
            self._residual_weight = self.forgetting * self._residual_weight + 1.0
        px = self.covariance @ x
        gain = px / (self.forgetting + x @ px)
        self.weights += gain * residual
        self.covariance = (self.covariance - np.outer(gain, px)) / self.forgetting
        # Forgetting inflates the directions no observation excites (a batch
        # that never varies): bounded, they cannot blow up.
        trace = np.trace(self.covariance)
        if trace > self._max_trace:
            self.covariance *= self._max_trace / trace
        self.num_observations += 1


@dataclass
class StepShape:
    """What a target step computes."""

    tokens: int
    """Target token rows (decode rows, prefill chunk tokens, tree nodes)."""
    trees: int = 0
    """Requests verified with a tree."""
    branches: int = 0
    """Off-first branches recomputed by branch replay."""
    waves: int = 0
    """Replay kernel calls per layer (the most branches of one request)."""

    def as_array(self) -> np.ndarray:
        """The cost model's features: the fields, then whether the step has
        a tree at all (its first tree switches the whole batch from vLLM's
        decode path to the tree path: at batch 16 on an AVX512 CPU, +4 to
        5 ms for one tree beside a 30 ms step, about +0.7 ms for each more)."""
        return np.array([self.tokens, self.trees, self.branches, self.waves,
                         self.trees > 0], dtype=float)


class StepCostModel:
    """Predicted milliseconds of target steps, draft work and the gap
    between steps, all learned from measurements (see the module docstring)."""

    _GAP_DECAY = 0.95
    LEVEL_WINDOW = 16
    """Recent decode steps whose median residual is the level the shape's
    costs stand on: long enough to shrug off a slow step, short enough to
    follow a phase of the machine."""
    SHAPE_FORGETTING = 0.98
    """Per difference of shapes: steady drafting sees a few per 16 steps (its
    plain and all-levels steps), a stalled one two per probe, so a longer
    memory would keep a noisy warm-up's estimate for hundreds of steps."""

    def __init__(self, forgetting: float = 0.99):
        # Priors matter only until the first few steps are measured.
        self.shape_ms = RecursiveLeastSquares(5, self.SHAPE_FORGETTING, np.zeros(5), 1e4)
        """Milliseconds per unit of each `StepShape.as_array` feature."""
        self._forgetting = forgetting
        self._previous: tuple[np.ndarray, float] | None = None
        self._recent: deque[tuple[np.ndarray, float]] = deque(maxlen=self.LEVEL_WINDOW)
        self.level_ms = 0.0
        """What a step costs beyond its shape's fitted costs, now: the
        median over the recent steps (refreshed with each observation, the
        only time it changes, not with each of a step's predictions)."""
        self.draft: dict[int, RecursiveLeastSquares] = {}
        """Per draft level (0: the catch-up and everything but the later
        passes; l: the l-th pass after it), its time linear in the requests."""
        self.gap_ms = 0.0

    def observe_target(self, shape: StepShape, ms: float) -> None:
        """A decode step's time; the step right after the last one observed
        unless `break_sequence` was called between them."""
        x = shape.as_array()
        if self._previous is not None:
            previous_x, previous_ms = self._previous
            if (x != previous_x).any():
                self.shape_ms.update(x - previous_x, ms - previous_ms)
        self._previous = (x, ms)
        self._recent.append((x, ms))
        self.level_ms = float(np.median(
            [step_ms - step_x @ self.shape_ms.weights for step_x, step_ms in self._recent]))

    def break_sequence(self) -> None:
        """The next step observed does not follow the last one (a step with
        prompt tokens ran between them): their difference is no pair."""
        self._previous = None

    def observe_draft(self, level: int, num_requests: int, ms: float) -> None:
        fit = self.draft.setdefault(level, RecursiveLeastSquares(
            2, self._forgetting, np.zeros(2), 1e4))
        fit.update(np.array([1.0, num_requests]), ms)

    def observe_gap(self, ms: float) -> None:
        self.gap_ms = self._GAP_DECAY * self.gap_ms + (1 - self._GAP_DECAY) * ms

    def step_ms_each(self, shapes: np.ndarray, reference: np.ndarray | None = None
                     ) -> np.ndarray:
        """Predicted time of steps of these shapes (`StepShape.as_array`
        rows [n, 5]), gap included. Returns [n].

        With `reference` (the shape of the step without the trees being
        weighed), each step's extra time over it is priced one standard
        error high, at most twice its prediction: the choice of trees is
        made on that difference, and where it is poorly measured, an
        underestimate costs throughput every step it lasts. At batch 16 on
        an AVX512 CPU, where neighbouring steps put a step's first tree at
        13 ms more than a plain step, the fit said 6 to 11 ms: 9 % of the
        steps there were plain, so the difference was measured rarely.
        Nor is the extra time ever below zero: no tree makes a step
        faster, but a noisy fit can say so (at batch 16 on the AVX512 EPYC
        it put a one-node tree at -0.6 ms, where consecutive steps
        measured +1.6 ms), and a tree priced that way looks free."""
        predicted = self.level_ms + shapes @ self.shape_ms.weights
        if reference is not None:
            difference = shapes - reference
            extra = difference @ self.shape_ms.weights
            margin = self.shape_ms.standard_errors(difference)
            predicted = (predicted + np.maximum(-extra, 0.0)
                         + np.clip(margin, 0.0, np.maximum(extra, 0.0)))
        return np.maximum(predicted, 1e-3) + self.gap_ms

    def draft_level_ms(self, level: int, num_requests: int) -> float:
        fit = self.draft.get(level)
        return 0.0 if fit is None else max(fit.predict(np.array([1.0, num_requests])), 0.0)


SAMPLED, GREEDY, LOOKUP = range(3)
"""Kinds of tree node, each calibrated on its own: drafted nodes of sampled
and of greedy requests, and nodes on a greedy request's context-lookup path
(`vllm_gsd.lookup`), which the draft may or may not have proposed: kinds
LOOKUP to LOOKUP + len(MATCH_LENGTH_BUCKETS), one per range of the length
of the suffix that matched."""
NUM_KINDS = LOOKUP + len(MATCH_LENGTH_BUCKETS) + 1


class AcceptanceCalibration:
    """P(node accepted) ≈ scale[kind, depth] * its path probability: the
    draft's, or 1 on a lookup path (whose scale is then its running
    acceptance rate at that depth, for its match length's range)."""

    def __init__(self, max_depth: int, decay: float = 0.995, prior_weight: float = 1.0):
        shape = (NUM_KINDS, max_depth + 1)
        # The prior says "the draft is calibrated" with the weight of one
        # fully probable node.
        self.accepted = np.full(shape, prior_weight)
        self.predicted = np.full(shape, prior_weight)
        self.decay = decay

    def value(self, request: BudgetRequest, j: int) -> float:
        kind, prob = request.kind(j)
        depth = request.tree.depths[j]
        return min(1.0, prob * self.accepted[kind, depth] / self.predicted[kind, depth])

    def observe(self, request: BudgetRequest, num_verified: int, path: list[int]) -> None:
        """One request-step: its verified nodes (the first `num_verified`)
        and the accepted path (flat indices)."""
        kinds = {request.kind(j)[0] for j in range(num_verified)}
        self.accepted[list(kinds)] *= self.decay
        self.predicted[list(kinds)] *= self.decay
        for j in range(num_verified):
            kind, prob = request.kind(j)
            self.predicted[kind, request.tree.depths[j]] += prob
        for j in path:
            self.accepted[request.kind(j)[0], request.tree.depths[j]] += 1.0


@dataclass
class BudgetRequest:
    """One request's drafted tree, offered to the budget."""

    tree: FlatTree
    greedy: bool
    pinned: bool = False
    """Verify the whole tree whatever it costs (seeded sampling)."""
    lookup: frozenset[int] = frozenset()
    """Flat indices of the nodes on the context-lookup path (greedy only)."""
    lookup_match: int = 0
    """`vllm_gsd.lookup.match_bucket` of the suffix the lookup path matched."""

    def kind(self, j: int) -> tuple[int, float]:
        """Node j's calibration kind and path probability."""
        if j in self.lookup:
            return LOOKUP + self.lookup_match, 1.0
        return (GREEDY if self.greedy else SAMPLED), self.tree.probs[j]

    def levels_needed(self, j: int) -> int:
        """Draft levels node j needs: none on the lookup path."""
        return 0 if j in self.lookup else self.tree.depths[j]

    def cut(self, kept: list[int]) -> None:
        """Keeps the `kept` flat nodes (ascending, ancestor-closed)."""
        index = {j: i for i, j in enumerate(kept)}
        self.lookup = frozenset(index[j] for j in self.lookup if j in index)
        self.tree = self.tree.subtree(kept)


@dataclass
class Choice:
    kept: list[list[int]]
    """Per request, the flat indices of the nodes to verify (ancestor-closed)."""


WARMUP_TREE_FRACTIONS = (1.0, 0.25, 0.5, 0.75)
"""Share of its nodes (by value) each warm-up tree step verifies, in turn."""

DRAFT_TIME_WINDOW = 16
"""Steady-state draft steps whose median is a batch size's draft time."""

PROBE_REQUESTS = 4
"""Most unpinned requests a measuring step drafts where no draft depth is
known to pay. Its cost is mostly the catch-up: the draft has to read every
token decoded since the request was last drafted (at batch 16 on the CPU,
40 to 200 ms of catch-up beside a 75 ms step, where drafting every step
catches up 1 to 3 tokens per request). A sample of the batch says what its
trees are worth as well as the whole batch does, at a fraction of that
cost; `GraphBudget.choose` scales the sample's nodes up to the batch."""

MAX_PROBE_INTERVAL = 256
"""Longest run of undrafted steps. A probe costs up to a step's worth of
time (at batch 16 on the CPU: its sample's catch-up, two draft passes
and a tree step, beside a 75 ms step), so where drafting clearly does
not pay, probes must be rare to cost little."""

CLOSE_CALL_GAIN = 0.85
"""A gain at or above this is a close call: in a batch of at most
PROBE_REQUESTS, probes stay at `probe_interval` instead of growing rarer.
On the CPU at batch 1 drafting pays 1.05-1.15x, and one probe's gain is
off by about 0.1 (its tree, the cost model's noise), so a run could stop
drafting on one unlucky estimate and, with probes growing rarer, not draft
again for 500 steps (5 of 9 short runs). There a probe costs about
(1 - gain) of a step, plus a short catch-up. In a larger batch the
catch-up of the probe's sample costs up to a step (the gain leaves it
out): probes every 16 steps at batch 16 cost 8 % of its throughput."""

LOOKUP_TRIAL_PAIRS = 8
"""Pairs of consecutive undrafted steps, one searching the contexts and
one not, measured at a batch size before their mean decides whether its
undrafted steps search (until then they alternate)."""

LOOKUP_PAIR_DECAY = 0.9
"""Weight of the past in a batch size's mean log rate ratio of searching,
per pair. One pair's ratio is off by roughly 8 % (an estimate, from a
50 ms step's few milliseconds of noise at batch 16 and how many lookup
tokens its requests happened to accept), the effect to tell apart about
4 %: about ten pairs in the mean put its noise near 2 %."""

LOOKUP_PAIR_CLIP = 0.25
"""Bound on one pair's log rate ratio: a step stalled by something else
(the first at a new shape, a collection) moves the mean no more than this."""

PLAIN_CHECK_BELOW_GAIN = 1.25
"""While the best gain is below this, a plain step every `probe_interval`
steps keeps plain decoding's step time current (above it, one every
MAX_PROBE_INTERVAL): run-to-run noise on a shared 2-core CPU moves step
times by 10-20 %, enough to flip a closer decision."""


@dataclass
class _BatchSizeState:
    """Whether drafting pays at one batch size (a power-of-two bucket of
    decoding requests) and how deep: the running gain of each draft depth,
    and how often to re-check them."""

    probe_interval: int
    gains: dict[int, float] = field(default_factory=dict)
    """Draft levels -> running mean of (best rate drafting that many levels)
    / (plain decoding's rate). A depth is missing until a step at this
    batch size has drafted at least that deep after the warm-up."""
    measured_at: dict[int, int] = field(default_factory=dict)
    """Draft levels -> the step that last measured its gain."""
    steps_since_draft: int = 0
    steps_since_full_depth: int = 0
    steps_since_plain: int = 0
    plain_check_at: int = -1
    """The last step that drafted nothing to measure a plain step while
    drafting paid (`GraphBudget._plain_check_interval`)."""
    draft_ms: dict[int, deque] = field(default_factory=dict)
    """Per draft level (`GraphBudget.observe_draft`), recent steady-state
    times (ms)."""
    search_log_gain: float = 0.0
    """Running mean over pairs of consecutive undrafted steps of
    log(rate of the one that searched the contexts / rate of the one that
    did not); meaningful once `search_pairs` is positive."""
    search_pairs: int = 0
    undrafted_since_trial: int = 0
    """Undrafted steps since one did the opposite of what the mean said."""
    lookup_ms: deque = field(default_factory=lambda: deque(maxlen=DRAFT_TIME_WINDOW))
    """Recent proposer times of undrafted steps that searched the contexts
    (`GraphBudget.observe_lookup`)."""
    confirm_next: bool = False
    """This step is a probe that drafts the whole (small) batch: the next
    one drafts again, to measure the draft's time (see
    `GraphBudget.next_step`)."""

    def best_levels(self) -> int:
        return max(self.gains, key=self.gains.__getitem__)


@dataclass
class _PricedTrees:
    """A step's trees as `GraphBudget.choose` priced them, to be weighed
    against a draft time: each depth's best rate over `undrafted_rate`."""

    prefixes: list[tuple[int, np.ndarray, np.ndarray]]
    """(levels, expected tokens, step time without drafting) of each prefix
    of the nodes no deeper than `levels` (several orders of them)."""
    undrafted_rate: float
    num_drafted: int
    trees: int

    def gains(self, draft_ms: Callable[[int, int], float]) -> dict[int, float]:
        """Draft levels -> gain, with draft_ms(requests, levels)."""
        gains: dict[int, float] = {}
        for levels, expected, step_ms in self.prefixes:
            rate = float(np.max(expected / (step_ms + draft_ms(self.num_drafted, levels))))
            gains[levels] = max(rate / self.undrafted_rate, gains.get(levels, 0.0))
        return gains


@dataclass
class _UndraftedInterval:
    """An undrafted step's choice to search the contexts or not, and what
    it bought: from its proposal to the next one (`GraphBudget.next_step`)."""

    step: int
    state: _BatchSizeState
    searched: bool
    requests: int
    """Decoding requests in the step that chose."""
    started: float
    """`GraphBudget.clock` at the proposal, in seconds."""
    next_requests: int = 0
    """Decoding requests in the step that verified its choice."""
    log_rate: float = 0.0
    """log(tokens per millisecond) of the interval, once finished."""

    def precedes(self, step: int, state: _BatchSizeState, requests: int) -> bool:
        """Whether this interval's step came right before `step`, of the
        same batch size and as many requests: their rates are comparable."""
        return self.step == step - 1 and self.state is state and self.requests == requests

    def pairs_with(self, previous: _UndraftedInterval) -> bool:
        return (previous.precedes(self.step, self.state, self.requests)
                and previous.searched != self.searched
                and previous.next_requests == self.next_requests)


@dataclass
class GraphBudget:
    """Per-step choice of the draft depth and of the nodes to verify; see
    the module docstring."""

    max_depth: int
    warmup_steps: int = 16
    """Steps that measure costs before the budget chooses: every other one
    drafts, its trees cut by `WARMUP_TREE_FRACTIONS`."""
    probe_interval: int = 16
    """While drafting does not pay, every this many steps drafts anyway; each
    probe that finds it not paying (in a small batch, clearly: see
    CLOSE_CALL_GAIN) doubles the interval, up to MAX_PROBE_INTERVAL.
    While a shallower draft pays best, every this many steps drafts all
    levels, so the deeper ones' gains stay current."""
    gain_decay: float = 0.9
    """Weight of the past in a depth's running gain when the step before
    measured it too (drafting at that depth pays: every step measures it),
    per tree the step verified: a step's gain averages its trees, so one
    of n trees weighs as n one-tree steps (but never more than a probe).
    At batch 12 on an AVX512 CPU, weighed as one tree, a probe's 1.19 kept
    the batch drafting at a loss for 14 steps, its gain sinking 0.02 a
    step toward the 0.9 each step measured."""
    probe_gain_decay: float = 0.5
    """Weight of the past when a probe measures a depth's gain."""
    costs: StepCostModel = field(default_factory=StepCostModel)
    calibration: AcceptanceCalibration = field(init=False)
    _by_batch_size: dict[int, _BatchSizeState] = field(default_factory=dict)
    _current: _BatchSizeState | None = None
    _levels: int = 0
    _exploring: bool = False
    """This step drafts to measure (a probe, a depth not measured yet, or
    all levels while a shallower depth pays), not because it pays."""
    _sampling: bool = False
    """This step drafts at most PROBE_REQUESTS unpinned requests."""
    _confirming: bool = False
    """This step follows a probe to measure the draft's time now."""
    _priced: _PricedTrees | None = None
    """This step's trees as `choose` priced them."""
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    _steps: int = 0
    _num_requests: int = 0
    """Decoding requests in the current step."""
    lookup_depth: int = 0
    """Longest context-lookup path offered (`vllm_gsd.lookup`); 0: none."""
    looks_up: bool = False
    """Whether this step's undrafted greedy requests search their contexts
    for a lookup path (a drafting step's drafted requests always do)."""
    clock: Callable[[], float] = time.perf_counter
    """Seconds; times the undrafted steps' intervals."""
    _interval: _UndraftedInterval | None = None
    """The current step's, if it drafts nothing."""
    _last_interval: _UndraftedInterval | None = None
    """The last finished one."""
    _accepted: int = 0
    """Tree nodes accepted since the current step's proposal."""

    def __post_init__(self) -> None:
        self.calibration = AcceptanceCalibration(max(self.max_depth, self.lookup_depth))

    def drafted_sample(self, num_unpinned: int) -> list[int] | None:
        """Which of the step's `num_unpinned` unpinned requests it drafts
        (indices, ascending; None: all of them). A measuring step where no
        draft depth is known to pay drafts PROBE_REQUESTS of them, drawn at
        random: the cheapest to catch up on would be the same few requests
        at every probe, and the gain theirs alone."""
        if not self._sampling or num_unpinned <= PROBE_REQUESTS:
            return None
        return sorted(self._rng.choice(num_unpinned, PROBE_REQUESTS, replace=False).tolist())

    @property
    def draft_gain(self) -> float | None:
        """The running gain of the best draft depth at the current step's
        batch size."""
        state = self._current
        return state.gains[state.best_levels()] if state and state.gains else None

    def next_step(self, num_requests: int) -> int:
        """Starts a draft step of `num_requests` decoding requests; returns
        how many levels unpinned requests are drafted (0: none)."""
        now = self.clock()
        self._finish_interval(num_requests, now)
        self._steps += 1
        self._num_requests = num_requests
        self._priced = None
        # The gain of drafting falls as the batch grows (less spare compute):
        # each batch size keeps its own, so a change of load starts afresh.
        state = self._by_batch_size.setdefault(
            num_requests.bit_length(), _BatchSizeState(self.probe_interval))
        self._current = state
        if self._warming_up():
            self._levels = self.max_depth if self._steps % 2 == 1 else 0
            self._sampling = False
            self._decide_lookup(state, now)
            return self._levels
        state.steps_since_draft += 1
        state.steps_since_full_depth += 1
        state.steps_since_plain += 1
        exploring, confirming = True, False
        after_probe, state.confirm_next = state.confirm_next, False
        if len(state.gains) < self.max_depth:  # a depth not measured yet
            levels = self.max_depth
        elif state.gains[state.best_levels()] > 1.0:
            if state.steps_since_plain >= self._plain_check_interval(state):
                levels = 0
                state.plain_check_at = self._steps
            elif state.steps_since_full_depth >= self.probe_interval:
                levels = self.max_depth
            else:
                levels, exploring = state.best_levels(), False
        elif after_probe:
            # A probe's catch-up after a pause is no measure of what drafting
            # costs (`observe_draft`), so while drafting is off, the draft
            # time of the last steps that drafted would stand for good: at
            # batch 1 on the CPU, 16 slow draft steps (10 ms where 5 was
            # usual) stopped drafting, and 80 steps later the budget still
            # priced a draft at 10 ms. The step after a probe drafts in the
            # steady state, and its time replaces theirs. In a larger batch
            # a probe drafts a sample, which the next step could not continue
            # cheaply; there drafting seldom comes close to paying.
            levels, confirming = self.max_depth, True
        elif state.steps_since_draft >= state.probe_interval:
            levels = self.max_depth
            state.confirm_next = num_requests <= PROBE_REQUESTS
        else:
            levels = 0
        self._exploring = levels > 0 and exploring
        self._confirming = confirming
        # Like the probe before it, a confirming step drafts the whole batch.
        self._sampling = self._exploring and not confirming and not (
            state.gains and state.gains[state.best_levels()] > 1.0)
        if not levels:
            state.steps_since_plain = 0
        elif not confirming:  # the probes keep their pace
            state.steps_since_draft = 0
        if levels == self.max_depth:
            state.steps_since_full_depth = 0
        self._levels = levels
        self._decide_lookup(state, now)
        return levels

    def _decide_lookup(self, state: _BatchSizeState, now: float) -> None:
        """Whether this step's undrafted requests search their contexts (a
        drafting step's always do: its trees take the paths), by the
        measured gain of searching (see the module docstring); an undrafted
        step starts the interval that measures its choice."""
        if self._levels > 0 or not self.lookup_depth:
            self.looks_up = self.lookup_depth > 0
            return
        previous = self._last_interval
        if state.search_pairs < LOOKUP_TRIAL_PAIRS:
            # Alternate with the step before where the two could pair; an
            # isolated undrafted step (beside drafting ones, or prompt tokens)
            # searches, as drafting steps do.
            adjacent = previous is not None and previous.precedes(
                self._steps, state, self._num_requests)
            self.looks_up = not previous.searched if adjacent else True
        else:
            state.undrafted_since_trial += 1
            trial = state.undrafted_since_trial >= self.probe_interval
            if trial:
                state.undrafted_since_trial = 0
            self.looks_up = (state.search_log_gain > 0.0) != trial
        self._interval = _UndraftedInterval(self._steps, state, self.looks_up,
                                            self._num_requests, now)

    def _finish_interval(self, num_requests: int, now: float) -> None:
        """Ends the last step's interval, if it was an undrafted step's that
        no prompt tokens broke (`break_sequence`): `num_requests` decoding
        requests (this step's) gave a token each, besides the accepted tree
        nodes; paired with the one before, it updates the running mean."""
        interval, self._interval = self._interval, None
        accepted, self._accepted = self._accepted, 0
        if interval is None:
            return
        ms = (now - interval.started) * 1e3
        if ms <= 0.0 or num_requests <= 0:
            return
        interval.next_requests = num_requests
        interval.log_rate = math.log((num_requests + accepted) / ms)
        previous, self._last_interval = self._last_interval, interval
        if previous is None or not interval.pairs_with(previous):
            return
        searched, not_searched = ((interval, previous) if interval.searched
                                  else (previous, interval))
        ratio = min(max(searched.log_rate - not_searched.log_rate, -LOOKUP_PAIR_CLIP),
                    LOOKUP_PAIR_CLIP)
        state = interval.state
        state.search_log_gain = (ratio if not state.search_pairs else
                                 LOOKUP_PAIR_DECAY * state.search_log_gain
                                 + (1 - LOOKUP_PAIR_DECAY) * ratio)
        state.search_pairs += 1

    def break_sequence(self) -> None:
        """The step after the current proposal has prompt tokens: its time
        is no measure of the proposal's choice, nor of a decode step's
        shape (`StepCostModel.break_sequence`)."""
        self._interval = None
        self.costs.break_sequence()

    @property
    def search_gain(self) -> float | None:
        """The current batch size's measured rate ratio of undrafted steps
        that search the contexts over those that do not; None before a
        pair of them was measured."""
        state = self._current
        return math.exp(state.search_log_gain) if state and state.search_pairs else None

    def _plain_check_interval(self, state: _BatchSizeState) -> int:
        """Steps between plain steps while drafting pays.

        Gains are relative to plain decoding's step time. Steps that all
        verify a tree cannot tell it from a tree's own cost (the two move
        together), and the last plain steps measured may be hundreds of
        steps old: at batch 1 on the CPU, plain steps timed at 55 ms in the
        warm-up ran at 45 ms later on. A plain step forgoes (1 - 1/gain) of
        a step's tokens, so they are frequent only where the decision to
        draft is close."""
        if state.gains[state.best_levels()] < PLAIN_CHECK_BELOW_GAIN:
            return self.probe_interval
        return MAX_PROBE_INTERVAL

    def observe_draft(self, num_requests: int, level_ms: list[float],
                      longest_catch_up: int) -> None:
        """The proposer's time for a step that drafted `num_requests`, the
        longest of whose catch-ups fed `longest_catch_up` tokens, by level:
        level_ms[0] is all but the later draft passes (the catch-up, which
        gives the first level, and building the graphs), level_ms[l] the
        pass that grew level l + 1. Counted only in the steady state, where
        a request was drafted the step before too and catches up on at most
        one accepted path, the root and a bonus token. Passes past the
        step's own depth grew pinned trees alone (drafted whole whatever the
        depth), so they are not what drafting the batch costs, and a
        sample's time is not the batch's."""
        if longest_catch_up <= self.max_depth + 2:
            state = self._current
            assert state is not None, "observe_draft() before next_step()"
            for level, ms in enumerate(level_ms[:self._levels]):
                self.costs.observe_draft(level, num_requests, ms)
                if not self._sampling:
                    window = state.draft_ms.setdefault(level, deque(maxlen=DRAFT_TIME_WINDOW))
                    if self._confirming:  # the only current measurement
                        window.clear()
                    window.append(ms)
            if self._confirming and self._priced is not None:
                self._record_gains(self._priced.gains(self.draft_ms), self._priced.trees)

    def observe_lookup(self, ms: float) -> None:
        """The proposer's time for an undrafted step that searched the
        contexts (the search, the offers and the choice)."""
        state = self._current
        assert state is not None, "observe_lookup() before next_step()"
        state.lookup_ms.append(ms)

    def _lookup_ms(self) -> float:
        state = self._current
        return statistics.median(state.lookup_ms) if state and state.lookup_ms else 0.0

    def draft_ms(self, num_requests: int, levels: int | None = None) -> float:
        """The current batch size's time to draft `levels` levels (default:
        all); a level not yet measured at this batch size takes the linear
        fit over all batch sizes."""
        state = self._current
        total = 0.0
        for level in range(self.max_depth if levels is None else levels):
            recent = state.draft_ms.get(level) if state is not None else None
            total += (statistics.median(recent) if recent
                      else self.costs.draft_level_ms(level, num_requests))
        return total

    def _warmup_tree_size(self, num_nodes: int) -> int:
        fraction = WARMUP_TREE_FRACTIONS[(self._steps // 2) % len(WARMUP_TREE_FRACTIONS)]
        return max(1, round(fraction * num_nodes)) if num_nodes else 0

    def _warming_up(self) -> bool:
        return self._steps <= self.warmup_steps

    def _record_gains(self, gains: dict[int, float], trees: int) -> None:
        state = self._current
        assert state is not None, "choose() before next_step()"
        if not gains:
            return
        first = not state.gains
        was_paying = not first and state.gains[state.best_levels()] > 1.0
        for levels, gain in gains.items():
            if levels not in state.gains:
                state.gains[levels] = gain
            else:
                # A probe is one step in up to MAX_PROBE_INTERVAL: weighed
                # like a drafting step's, the few of them could not lift a
                # noisy gain back over 1 for hundreds of steps (seen at batch
                # 1, where whole trees gave 1.15x while the budget hardly
                # drafted). Drafting that resumes wrongly costs little:
                # every step then measures the gain.
                # The step after a probe weighs as one: the probe's gain was
                # priced with the draft time this step replaced.
                state.gains[levels] = self._running_mean(
                    state.gains[levels], gain,
                    None if self._confirming else state.measured_at.get(levels), trees)
            state.measured_at[levels] = self._steps
        close_call = (state.gains[state.best_levels()] >= CLOSE_CALL_GAIN
                      and self._num_requests <= PROBE_REQUESTS)
        if close_call or state.gains[state.best_levels()] > 1.0:
            state.probe_interval = self.probe_interval
        elif not (was_paying or first or self._confirming):  # the probe backed off
            state.probe_interval = min(2 * state.probe_interval, MAX_PROBE_INTERVAL)

    def _running_mean(self, mean: float, gain: float, measured_at: int | None,
                      trees: int) -> float:
        """`mean` updated with a step's `gain` (see `gain_decay`), the mean
        last measured at step `measured_at`."""
        previous = self._steps - 1
        # A plain check is no pause in drafting: weighed as a probe, the
        # step after it stopped drafting on one poor tree (at batch 1 on
        # the CPU, 3 times in 300 steps, each for 15 to 30 steps).
        if self._current is not None and self._current.plain_check_at == previous:
            previous -= 1
        consecutive = measured_at == previous
        decay = (max(self.gain_decay ** max(trees, 1), self.probe_gain_decay)
                 if consecutive else self.probe_gain_decay)
        return decay * mean + (1 - decay) * gain

    def choose(self, requests: list[BudgetRequest], base_tokens: int,
               unpinned_in_batch: int | None = None) -> Choice:
        """The nodes to verify this step.

        requests: the drafted trees. base_tokens: the step's target rows
        without any tree: one per decoding request, each of which yields a
        token whatever is verified, those without a tree too.
        unpinned_in_batch: the unpinned requests that could have been drafted,
        where the unpinned ones among `requests` are a sample of them
        (`drafted_sample`); the rates and gains are the batch's, each
        sampled node standing for as many as the sample is smaller.
        """
        num_unpinned = sum(not r.pinned for r in requests)
        scale = (unpinned_in_batch / num_unpinned
                 if unpinned_in_batch and num_unpinned else 1.0)
        num_drafted = len(requests) - num_unpinned + scale * num_unpinned
        run_starts = [r.tree.run_starts() for r in requests]
        chosen: list[list[int]] = [[] for _ in requests]
        pinned_branches = [0] * len(requests)
        # Every decoding request's token counts, not only those of the
        # requests offering a tree: an undrafted step at batch 16 that rated
        # two lookup offers against their own two tokens priced a node worth
        # 0.6 tokens as 30 % more throughput, not the 4 % it is, and verified
        # lookup trees that cost more than they gave.
        pinned_expected = float(base_tokens)
        for i, r in enumerate(requests):
            if r.pinned:
                chosen[i] = list(range(len(r.tree)))
                pinned_branches[i] = len(run_starts[i] - {0})
                pinned_expected += sum(self._value(r, j) for j in chosen[i])

        def prefix_rows(order: list[tuple[int, int, float]]) -> np.ndarray:
            """Row k: the step with the first k nodes of `order` added (each
            `scale` times), as expected tokens, then the step's
            `StepShape.as_array`."""
            rows = np.zeros((len(order) + 1, 6))
            has_tree = [bool(c) for c in chosen]
            branches = list(pinned_branches)
            rows[0, :5] = [pinned_expected, base_tokens + sum(map(len, chosen)),
                           sum(has_tree), sum(branches), max(branches, default=0)]
            for k, (i, j, value) in enumerate(order, start=1):
                # Replay recomputes every run but the first (`FlatTree.branches`);
                # selection keeps a first child right after its parent.
                is_branch = j != 0 and j in run_starts[i]
                rows[k, :5] = rows[k - 1, :5] + np.array(
                    [value, 1, not has_tree[i], is_branch, 0]) * scale
                has_tree[i] = True
                branches[i] += is_branch
                rows[k, 4] = max(rows[k - 1, 4], branches[i])
            rows[:, 5] = rows[:, 2] > 0
            return rows

        order = self._unpinned_nodes_by_value(requests)
        # Every off-first branch costs a replay wave (on an AVX2 CPU about
        # 12 ms beside a 55 ms step), so a deeper chain can beat a more
        # valuable sibling, a node set no prefix of the value order holds:
        # the prefixes of each request's first branch alone compete too.
        candidates = [order]
        first_branch_ends = [min(starts - {0}, default=len(r.tree))
                             for r, starts in zip(requests, run_starts)]
        first_branch = [node for node in order if node[1] < first_branch_ends[node[0]]]
        if len(first_branch) < len(order):
            candidates.append(first_branch)
        best_rate, best_nodes = -1.0, []
        priced: list[tuple[int, np.ndarray, np.ndarray]] = []  # `_PricedTrees.prefixes`
        warming_up = self._warming_up()
        # Drafting pays when it beats what the step gets without it: plain
        # decoding, or the lookup paths alone (their search included) where
        # there are any.
        undrafted_rows = prefix_rows([node for node in order
                                      if requests[node[0]].levels_needed(node[1]) == 0])
        base_shape = undrafted_rows[0, 1:]
        undrafted_ms = self.costs.step_ms_each(undrafted_rows[:, 1:], base_shape)
        plain_rate = undrafted_rows[0, 0] / undrafted_ms[0]
        lookup_rate = float(np.max(undrafted_rows[:, 0] / (undrafted_ms + self._lookup_ms())))
        undrafted_rate = max(plain_rate, lookup_rate)
        for nodes in candidates:
            rows = prefix_rows(nodes)
            step_ms = self.costs.step_ms_each(rows[:, 1:], base_shape)
            rates = rows[:, 0] / step_ms
            k = int(np.argmax(rates))
            if rates[k] > best_rate:
                best_rate, best_nodes = rates[k], nodes[:k]
            # The gain of drafting each depth up to this step's: the best
            # prefix of its nodes, with the time of drafting that deep. Not
            # in the warm-up, whose cost model has not seen enough steps.
            for levels in range(1, 0 if warming_up else self._levels + 1):
                shallow = [node for node in nodes
                           if requests[node[0]].levels_needed(node[1]) <= levels]
                if not shallow:
                    continue
                if len(shallow) == len(nodes):  # every node: priced above already
                    shallow_rows, shallow_ms = rows[1:], step_ms[1:]
                else:
                    shallow_rows = prefix_rows(shallow)[1:]
                    shallow_ms = self.costs.step_ms_each(shallow_rows[:, 1:], base_shape)
                priced.append((levels, shallow_rows[:, 0], shallow_ms))
        if warming_up:
            best_nodes = order[:self._warmup_tree_size(len(order))]
        elif self._exploring:
            best_nodes = best_nodes + self._deepest_path(requests, order, best_nodes)
        self._priced = _PricedTrees(priced, undrafted_rate, round(num_drafted), len(requests))
        if not self._confirming:  # else once its own draft time is known
            self._record_gains(self._priced.gains(self.draft_ms), len(requests))
        for i, j, _ in best_nodes:
            chosen[i].append(j)
        return Choice([sorted(c) for c in chosen])

    @staticmethod
    def _deepest_path(requests: list[BudgetRequest], order: list[tuple[int, int, float]],
                      chosen: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
        """The nodes of `order` not in `chosen` on the path to its most
        valuable node of the deepest depth in it.

        A measuring step verifies them beside its choice: the calibration
        and the cost model learn only from verified nodes, so a probe that
        verified none would measure the draft's time and nothing else, and
        a budget that once priced trees too dear (from an unlucky warm-up)
        would never see one again. Seen on an AVX2 CPU: 911 of 916 steps
        undrafted, where a one-node chain pays 1.15x."""
        depth = {(i, j): requests[i].levels_needed(j) for i, j, _ in order}
        deepest = max(depth.values(), default=0)
        if deepest == 0:  # no drafted node to measure
            return []
        i, leaf, _ = next(node for node in order if depth[node[:2]] == deepest)
        path = {leaf, *requests[i].tree.ancestors(leaf)}
        taken = {node[:2] for node in chosen}
        return [node for node in order
                if node[0] == i and node[1] in path and node[:2] not in taken]

    def observe_acceptance(self, request: BudgetRequest, num_verified: int,
                           path: list[int]) -> None:
        self._accepted += len(path)
        self.calibration.observe(request, num_verified, path)

    def _value(self, request: BudgetRequest, j: int) -> float:
        return self.calibration.value(request, j)

    def _unpinned_nodes_by_value(self, requests: list[BudgetRequest]
                                 ) -> list[tuple[int, int, float]]:
        """(request, flat node, value) of every unpinned node, best first,
        each after its parent."""
        children: list[dict[int, list[int]]] = []
        heap: list[tuple[float, int, int]] = []
        for i, r in enumerate(requests):
            by_parent: dict[int, list[int]] = {}
            for j, parent in enumerate(r.tree.parents):
                by_parent.setdefault(parent, []).append(j)
            children.append(by_parent)
            if not r.pinned:
                for j in by_parent.get(-1, []):
                    heap.append((-self._value(r, j), i, j))
        heapq.heapify(heap)
        order = []
        while heap:
            negative_value, i, j = heapq.heappop(heap)
            order.append((i, j, -negative_value))
            for child in children[i].get(j, []):
                heapq.heappush(heap, (-self._value(requests[i], child), i, child))
        return order

