"""The adaptive graph budget (vllm_gsd.budget), on synthetic hardware."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_gsd.budget import (CLOSE_CALL_GAIN, PROBE_REQUESTS, AcceptanceCalibration,
                             BudgetRequest, GraphBudget, RecursiveLeastSquares,
                             StepCostModel, StepShape)
from vllm_gsd.graph import FlatTree

# Flat (DFS) order: a chain 0-1-2 (path probs .6 .4 .3), node 3 a second child
# of 0 (.1), then a second root child 4 (.3) with its child 5 (.2).
TREE = FlatTree(tokens=(10, 11, 12, 13, 20, 21), parents=(-1, 0, 1, 0, -1, 4),
                depths=(1, 2, 3, 2, 1, 2), probs=(0.6, 0.4, 0.3, 0.1, 0.3, 0.2))


def trained_budget(ms_per_token: float, fixed_ms: float, ms_per_branch: float = 0.5,
                   ms_per_tree: float = 0.0, draft_level_ms: tuple = (1.0, 1.0, 1.0),
                   steps: int = 200) -> GraphBudget:
    """A budget whose cost model has measured hardware where a step costs
    fixed_ms + ms_per_token * tokens + ms_per_tree * trees
    + ms_per_branch * branches, and drafting level l costs draft_level_ms[l]."""
    budget = GraphBudget(max_depth=3, warmup_steps=0, probe_interval=10**9)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        shape = StepShape(int(rng.integers(1, 200)), int(rng.integers(0, 16)),
                          int(rng.integers(0, 20)), int(rng.integers(0, 5)))
        budget.costs.observe_target(shape, fixed_ms + ms_per_token * shape.tokens
                                    + ms_per_tree * shape.trees
                                    + ms_per_branch * shape.branches)
        for level, ms in enumerate(draft_level_ms):
            budget.costs.observe_draft(level, int(rng.integers(1, 32)), ms)
    return budget


def choose(budget: GraphBudget, requests: list[BudgetRequest], base_tokens: int):
    budget.next_step(len(requests))
    return budget.choose(requests, base_tokens)


def test_recursive_least_squares_recovers_a_linear_cost():
    model = RecursiveLeastSquares(3, 0.99, np.zeros(3), 1e4)
    rng = np.random.default_rng(1)
    for _ in range(100):
        x = np.array([1.0, *rng.uniform(0, 50, 2)])
        model.update(x, x @ [20.0, 0.5, 2.0])
    assert model.weights == pytest.approx([20.0, 0.5, 2.0], rel=1e-3)


def test_rare_slow_steps_do_not_bend_the_cost_fit():
    """One step in ten pays a one-off set-up (+25 ms, as the first step at a
    new shape does on the CPU); the fit stays on the ordinary steps."""
    model = RecursiveLeastSquares(3, 0.99, np.zeros(3), 1e4)
    rng = np.random.default_rng(2)
    for i in range(300):
        x = np.array([1.0, *rng.integers(1, 8, 2)])
        noise = rng.normal(0, 0.5) + (25.0 if i % 10 == 5 else 0.0)
        model.update(x, x @ [33.0, 0.5, 3.0] + noise)
    assert model.weights == pytest.approx([33.0, 0.5, 3.0], abs=0.6)


def test_a_phase_of_the_machine_is_not_blamed_on_the_trees():
    """A shared CPU runs slow for a while (+12 ms a step), and the budget's
    choices lag behind it: the tree steps fall mostly in slow phases, the
    plain steps mostly in fast ones. Fitted to the times themselves, trees
    would look 12 ms dearer than they are; between consecutive steps the
    phase cancels."""
    costs = StepCostModel()
    plain, tree = StepShape(1), StepShape(2, trees=1)
    rng = np.random.default_rng(3)
    for step in range(600):
        slow = (step // 30) % 2 == 1
        shape = tree if ((step - 3) // 30) % 2 == 1 else plain
        level = 52.0 if slow else 40.0
        costs.observe_target(shape, level + 4.5 * shape.trees + rng.normal(0, 0.5))
    plain_ms, tree_ms = costs.step_ms_each(np.array([plain.as_array(), tree.as_array()]))
    assert tree_ms - plain_ms == pytest.approx(4.5, abs=0.5)
    assert plain_ms == pytest.approx(52.0, abs=1.0)  # the phase it is in now


def test_steps_apart_are_no_pair():
    """A step with prompt tokens between two decode steps (unmeasured) can
    hide a change of phase: the two are not compared."""
    costs = StepCostModel()
    for _ in range(10):
        costs.observe_target(StepShape(1), 40.0)
        costs.break_sequence()
        costs.observe_target(StepShape(2, trees=1), 60.0)
        costs.break_sequence()
    assert costs.shape_ms.num_observations == 0


def test_subtree_keeps_flat_order_and_renumbers_parents():
    sub = TREE.subtree([0, 1, 4])
    assert sub.tokens == (10, 11, 20)
    assert sub.parents == (-1, 0, -1)
    assert sub.depths == (1, 2, 1)
    assert sub.probs == (0.6, 0.4, 0.3)
    with pytest.raises(ValueError, match="without its parent"):
        TREE.subtree([0, 5])


def test_free_tokens_verify_the_whole_tree():
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_branch=0.0)
    choice = choose(budget, [BudgetRequest(TREE, greedy=True)], base_tokens=1)
    assert choice.kept == [list(range(len(TREE)))]
    assert budget.draft_gain > 1.0


def test_expensive_tokens_verify_nothing_and_soon_stop_drafting():
    # Each token costs as much as a whole plain step: no node can pay. The
    # first step measures every depth, so it verifies the path to the most
    # valuable deepest node (for the calibration and the cost model), and
    # nothing else.
    budget = trained_budget(ms_per_token=40.0, fixed_ms=0.0)
    choice = choose(budget, [BudgetRequest(TREE, greedy=True)], base_tokens=1)
    assert choice.kept == [[0, 1, 2]]
    assert budget.draft_gain < 1.0
    assert not budget.next_step(1)
    assert budget.choose([BudgetRequest(TREE, greedy=True)], base_tokens=1).kept == [[]]


def test_middle_cost_keeps_the_most_valuable_nodes_each_after_its_parent():
    # The next node pays while its value exceeds the current rate (tokens
    # per ms) times its 10 ms: nodes of value .6 .4 .3 .3 do, .2 does not.
    budget = trained_budget(ms_per_token=10.0, fixed_ms=60.0, ms_per_branch=0.0)
    choice = choose(budget, [BudgetRequest(TREE, greedy=True)], base_tokens=1)
    assert choice.kept == [[0, 1, 2, 4]]
    TREE.subtree(choice.kept[0])  # closed under ancestors


# A first child (.5) whose child (.25) is worth less than the root's second
# child (.35): by value the sibling comes before the grandchild.
SIBLING_BEFORE_GRANDCHILD = FlatTree(tokens=(10, 11, 20), parents=(-1, 0, -1),
                                     depths=(1, 2, 1), probs=(0.5, 0.25, 0.35))


@pytest.mark.parametrize("ms_per_branch, kept", [(15.0, [0, 1]), (0.0, [0, 1, 2])])
def test_a_dear_replay_wave_makes_a_deeper_chain_beat_a_sibling(ms_per_branch, kept):
    """Tokens cost 0.5 ms on a 50 ms step. If an off-first branch costs
    15 ms (a replay wave on an AVX2 CPU), the chain of the first child and
    its child (1.75 tokens in 51.5 ms) beats every prefix of the value order
    (at best all three nodes: 2.1 in 67 ms); if branches are free, all three."""
    budget = trained_budget(ms_per_token=0.5, fixed_ms=50.0, ms_per_branch=ms_per_branch)
    choice = choose(budget, [BudgetRequest(SIBLING_BEFORE_GRANDCHILD, greedy=True)],
                    base_tokens=1)
    assert choice.kept == [kept]


def test_batch_size_shrinks_the_tree_on_linear_hardware():
    # CPU-like: a step costs 40 ms + 2 ms per token. At batch 1 the tree's
    # best nodes pay; at batch 16 every extra token slows 16 requests.
    budget = trained_budget(ms_per_token=2.0, fixed_ms=40.0)
    # The first step at a batch size measures (see
    # test_a_budget_that_stopped_drafting_learns_from_its_probes); the
    # second decides.
    for _ in range(2):
        alone = choose(budget, [BudgetRequest(TREE, greedy=True)], base_tokens=1)
    for _ in range(2):
        batch = choose(budget, [BudgetRequest(TREE, greedy=True)] * 16, base_tokens=16)
    assert len(alone.kept[0]) >= 3
    assert sum(map(len, batch.kept)) < 16 * len(alone.kept[0])
    assert sum(map(len, batch.kept)) <= 16  # at most about one node each


def test_per_request_tree_work_stops_trees_in_a_large_batch():
    # Tokens are free, but each tree costs 4 ms of its own: one node worth
    # 0.3 tokens pays beside a 40 ms step for one request, not for sixteen.
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_tree=4.0)
    one_node = FlatTree((1,), (-1,), (1,), (0.3,))
    alone = choose(budget, [BudgetRequest(one_node, greedy=True)], base_tokens=1)
    assert alone.kept == [[0]]
    measuring = choose(budget, [BudgetRequest(one_node, greedy=True)] * 16, base_tokens=16)
    assert measuring.kept == [[0]] + [[]] * 15  # one path, to measure
    batch = choose(budget, [BudgetRequest(one_node, greedy=True)] * 16, base_tokens=16)
    assert batch.kept == [[]] * 16


def test_pinned_requests_keep_their_whole_tree():
    # Verifying costs more than it can earn, yet a seeded sampled request's
    # tree is whole, so its random numbers do not depend on timing.
    budget = trained_budget(ms_per_token=40.0, fixed_ms=0.0)
    choice = choose(budget, [BudgetRequest(TREE, greedy=False, pinned=True)],
                    base_tokens=1)
    assert choice.kept == [list(range(len(TREE)))]


def test_after_the_warmup_probes_grow_ever_rarer():
    budget = GraphBudget(max_depth=3, warmup_steps=2, probe_interval=5)
    budget.costs = trained_budget(ms_per_token=40.0, fixed_ms=0.0).costs
    full = [list(range(len(TREE)))]
    drafted_steps = []
    for step in range(1, 1000):
        if budget.next_step(1):
            drafted_steps.append(step)
            kept = budget.choose([BudgetRequest(TREE, greedy=True)], base_tokens=1).kept
            assert (kept == full) == (step <= 2)  # warm-up: full trees
    # The warm-up drafts every other step; step 3 measures the gain (warm-up
    # steps, with an untrained cost model, do not count); each probe that
    # finds drafting still not paying doubles the interval, and the step
    # after it drafts too, to measure the draft's time.
    probes = [8, 18, 38, 78, 158, 318, 574, 830]
    assert drafted_steps == [1, 3] + [s for p in probes for s in (p, p + 1)]


@pytest.mark.parametrize("batch, ms_per_token, intervals", [
    # Each probe of a small batch is followed by a step that measures the
    # draft's time (`test_a_stale_draft_time_is_measured_again_after_a_probe`).
    (1, 4.0, [16] + [1, 15] * 11 + [1]),
    # A large batch's probe drafts a sample, whose catch-up costs up to a
    # step (not in the gain): its probes grow rarer all the same.
    (16, 0.5, [16, 32, 64]),
])
def test_a_close_call_keeps_probing_in_a_small_batch(batch, ms_per_token, intervals):
    """Where drafting almost pays, one probe's estimate decides little: the
    probes stay at the base interval, so a gain a little too low from one
    unlucky tree is soon corrected (on the CPU at batch 1, growing intervals
    left 5 short runs in 9 nearly undrafted for 500 steps)."""
    budget = trained_budget(ms_per_token=ms_per_token, fixed_ms=40.0, ms_per_branch=0.0)
    budget.probe_interval = 16
    poor = [BudgetRequest(FlatTree((1,), (-1,), (1,), (0.1,)), greedy=True)] * batch
    drafted_steps = []
    for step in range(200):
        if budget.next_step(batch):
            drafted_steps.append(step)
            budget.choose(poor, base_tokens=batch)
    assert CLOSE_CALL_GAIN < budget.draft_gain < 1.0
    assert np.diff(drafted_steps).tolist() == intervals


def test_warmup_measures_steps_with_and_without_trees():
    """After the warm-up, driven by the budget's own decisions, the cost
    model predicts a plain step as well as a tree step. Tree steps alone
    leave the plain step unidentified: on the CPU at batch 16 it was
    predicted at 1 ms instead of 40, and drafting looked ten times too
    costly."""
    budget = GraphBudget(max_depth=3, warmup_steps=16)
    plain, tree = StepShape(16), StepShape(112, trees=16, branches=30, waves=3)

    def measured_ms(shape: StepShape) -> float:
        return 30.0 + 0.5 * shape.tokens + 0.2 * shape.trees + 0.3 * shape.branches

    for _ in range(16):
        shape = tree if budget.next_step(16) else plain
        budget.costs.observe_target(shape, measured_ms(shape))
    predicted = budget.costs.step_ms_each(np.array([plain.as_array(), tree.as_array()]))
    np.testing.assert_allclose(predicted, [measured_ms(plain), measured_ms(tree)], rtol=0.05)


def test_draft_time_is_learned_from_steady_state_steps_only():
    """A step whose catch-up is longer than one accepted path plus the root
    and a bonus token (after a pause in drafting, or a new prompt) does not
    teach the budget what drafting costs; nor do a few slow first passes
    (allocations, kernel set-up); each batch size has its own."""
    budget = GraphBudget(max_depth=3)
    budget.next_step(16)
    budget.observe_draft(16, [40.0, 9.0, 9.0], longest_catch_up=2)
    for _ in range(50):
        budget.observe_draft(16, [6.0, 2.0, 2.0], longest_catch_up=5)
        budget.observe_draft(16, [60.0, 9.0, 9.0], longest_catch_up=6)
    budget.observe_draft(16, [40.0, 9.0, 9.0], longest_catch_up=2)
    assert budget.draft_ms(16) == pytest.approx(10.0)
    assert budget.draft_ms(16, levels=1) == pytest.approx(6.0)
    budget.next_step(1)
    budget.next_step(1)  # the warm-up drafts every other step
    for _ in range(5):
        budget.observe_draft(1, [3.0, 1.0], longest_catch_up=3)
    assert budget.draft_ms(1, levels=2) == pytest.approx(4.0)


@pytest.mark.parametrize("batch", [1, PROBE_REQUESTS])
def test_a_stale_draft_time_is_measured_again_after_a_probe(batch):
    """A slow spell of draft steps stops drafting; a probe's long catch-up
    is no measure of the draft's time, so the step after it measures it in
    the steady state, and drafting resumes once the draft is fast again
    (without that, the slow median stood for good: the probes alone never
    refresh it)."""
    budget = trained_budget(ms_per_token=1.0, fixed_ms=40.0, ms_per_branch=0.0)
    budget.probe_interval = 16
    requests = [BudgetRequest(TREE, greedy=True)] * batch
    draft_level_ms, drafted, last_drafted = 80.0, [], -2
    for step in range(300):
        if step == 100:
            draft_level_ms = 1.0  # the slow spell ends
        levels = budget.next_step(batch)
        drafted.append(bool(levels))
        if levels:
            budget.choose(requests, base_tokens=batch)
            catch_up = 2 if last_drafted == step - 1 else 20
            budget.observe_draft(batch, [draft_level_ms] * levels, longest_catch_up=catch_up)
            last_drafted = step
    assert sum(drafted[60:100]) <= 6  # probes (and the steps after them) only
    assert budget.draft_ms(batch, levels=1) == pytest.approx(1.0)
    assert sum(drafted[-100:]) >= 90  # drafting again


def test_passes_that_grew_pinned_trees_alone_are_not_the_batchs_draft_time():
    """Seeded sampled requests are drafted whole whatever depth the budget
    chose, also in steps that draft nobody else: those passes cost far less
    than drafting the batch does, and must not teach the budget that it is
    cheap."""
    budget = GraphBudget(max_depth=3, warmup_steps=16)
    for _ in range(4):
        assert budget.next_step(16) == 3
        budget.observe_draft(16, [6.0, 2.0, 2.0], longest_catch_up=2)
        assert budget.next_step(16) == 0
        budget.observe_draft(16, [1.0, 0.5, 0.5], longest_catch_up=2)
    assert budget.draft_ms(16) == pytest.approx(10.0)


def test_warmup_tries_trees_of_every_size():
    """The warm-up's tree steps verify a quarter to all of the tree, so the
    cost model can price a small tree too. From whole trees alone a
    one-node tree was predicted at 65 ms on the CPU (a whole one: 51 ms)."""
    budget = GraphBudget(max_depth=3, warmup_steps=16)
    request = BudgetRequest(TREE, greedy=True)

    def measured_ms(shape: StepShape) -> float:
        return 30.0 + 0.5 * shape.tokens + 3.0 * shape.trees + 2.0 * shape.branches

    sizes = set()
    for _ in range(16):
        shape = StepShape(1)
        if budget.next_step(1):
            kept = budget.choose([request], base_tokens=1).kept[0]
            sizes.add(len(kept))
            branches = len(TREE.subtree(kept).run_starts() - {0})
            shape = StepShape(1 + len(kept), 1, branches, branches)
        budget.costs.observe_target(shape, measured_ms(shape))
    assert sizes == {2, 3, 4, 6}
    one_node = StepShape(2, trees=1)
    predicted = budget.costs.step_ms_each(np.array([one_node.as_array()]))[0]
    assert predicted == pytest.approx(measured_ms(one_node), rel=0.03)


def test_each_batch_size_keeps_its_own_gain():
    # Tokens are free, each tree costs 4 ms: drafting pays for one request,
    # not for sixteen. Running at 16 does not stop drafting at 1, and back
    # at 16 the budget does not start drafting again.
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_tree=4.0)
    big = [BudgetRequest(FlatTree((1,), (-1,), (1,), (0.3,)), greedy=True)] * 16
    for _ in range(20):
        choose(budget, big, base_tokens=16)
    assert budget.draft_gain < 1.0 and not budget.next_step(16)
    assert budget.next_step(1)
    for _ in range(5):
        choose(budget, [BudgetRequest(TREE, greedy=True)], base_tokens=1)
        assert budget.draft_gain > 1.0
    assert budget.next_step(1) and not budget.next_step(16)


def test_where_drafting_is_not_known_to_pay_a_large_batch_drafts_a_sample():
    """A measuring step that no paying depth backs (the first at a batch
    size, a probe) drafts PROBE_REQUESTS requests, drawn at random:
    catching up on every request's tokens since it was last drafted cost
    most of a probe. Where drafting pays, every request is drafted."""
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_tree=4.0)
    budget.probe_interval = 4
    one_node = [BudgetRequest(FlatTree((1,), (-1,), (1,), (0.3,)), greedy=True)]
    samples = []
    for _ in range(13):
        if budget.next_step(16):
            samples.append(budget.drafted_sample(16))
            budget.choose(one_node * PROBE_REQUESTS, base_tokens=16, unpinned_in_batch=16)
        else:
            assert budget.drafted_sample(16) is None
    assert budget.draft_gain < 1.0
    assert len(samples) == 3  # the first step, then probes at 5 and 13
    assert all(len(set(s)) == PROBE_REQUESTS and set(s) <= set(range(16)) for s in samples)
    assert len({tuple(s) for s in samples}) > 1  # not the same requests every time
    assert budget.drafted_sample(PROBE_REQUESTS) is None  # nothing to leave out

    assert budget.next_step(1)  # measures the new batch size
    budget.choose([BudgetRequest(TREE, greedy=True)], base_tokens=1)
    assert budget.draft_gain > 1.0
    assert budget.next_step(16) == 0 and budget.next_step(1)
    assert budget.drafted_sample(16) is None  # batch 1's drafting pays


def test_a_probe_sample_is_drawn_evenly():
    budget = GraphBudget(max_depth=2, warmup_steps=0)
    budget.next_step(16)  # a new batch size: measured, by a sample
    counts = np.zeros(16)
    for _ in range(4000):
        counts[budget.drafted_sample(16)] += 1
    np.testing.assert_allclose(counts / 4000, PROBE_REQUESTS / 16, atol=0.03)


@pytest.mark.parametrize("ms_per_token", [0.0, 0.5, 2.0])
def test_a_samples_nodes_stand_for_the_batchs(ms_per_token):
    """Four of sixteen requests with the same trees: the gain is the whole
    batch's."""
    gains = []
    for drafted, unpinned_in_batch in ((16, None), (4, 16)):
        budget = trained_budget(ms_per_token=ms_per_token, fixed_ms=40.0, ms_per_tree=0.5)
        budget.next_step(16)
        budget.choose([BudgetRequest(TREE, greedy=True)] * drafted, base_tokens=16,
                      unpinned_in_batch=unpinned_in_batch)
        gains.append(budget.draft_gain)
    # The sample's prefixes take four nodes of the batch at a time.
    assert gains[1] == pytest.approx(gains[0], rel=0.02)
    assert gains[1] <= gains[0] + 1e-9


def test_one_good_probe_resumes_drafting():
    """While drafting is off only probes measure the gain, one step in up
    to 256: each must count, or a gain just under 1 stays there."""
    budget = trained_budget(ms_per_token=4.0, fixed_ms=40.0, ms_per_branch=0.0)
    budget.probe_interval = 16
    poor = [BudgetRequest(FlatTree((1,), (-1,), (1,), (0.1,)), greedy=True)]
    for _ in range(3):
        choose(budget, poor, base_tokens=1)
    assert 0.8 < budget.draft_gain < 1.0
    while not budget.next_step(1):
        pass
    # This probe's tree pays 1.28x: weighed 1 in 10 it would leave 0.98.
    fair = FlatTree(TREE.tokens, TREE.parents, TREE.depths, (0.4, 0.2, 0.1, 0.05, 0.1, 0.05))
    budget.choose([BudgetRequest(fair, greedy=True)], base_tokens=1)
    assert budget.draft_gain > 1.0 and budget.next_step(1)


def test_one_poor_step_does_not_stop_drafting():
    budget = trained_budget(ms_per_token=1.0, fixed_ms=40.0)
    unsure = FlatTree((1,), (-1,), (1,), (0.01,))
    for _ in range(5):
        choose(budget, [BudgetRequest(TREE, greedy=True)], base_tokens=1)
    choose(budget, [BudgetRequest(unsure, greedy=True)], base_tokens=1)
    assert budget.next_step(1)


def test_a_plain_check_is_no_pause_in_drafting():
    """While drafting pays a little, every 16th step is plain, to keep
    plain decoding's time current; the step after it weighs as any other
    drafting step, not as a probe, so one poor tree there does not stop
    drafting."""
    budget = trained_budget(ms_per_token=1.0, fixed_ms=40.0, draft_level_ms=(10.0,) * 3)
    budget.probe_interval = 16
    fair = FlatTree(TREE.tokens, TREE.parents, TREE.depths, (0.4, 0.2, 0.1, 0.05, 0.1, 0.05))
    levels = [budget.next_step(1)]
    while not (len(levels) > 2 and levels[-2] == 0):
        budget.choose([BudgetRequest(fair, greedy=True)], base_tokens=1)
        levels.append(budget.next_step(1))
    assert 1.0 < budget.draft_gain < 1.25 and levels.count(0) == 1 and levels[-1]
    unsure = FlatTree((1,), (-1,), (1,), (0.01,))
    budget.choose([BudgetRequest(unsure, greedy=True)], base_tokens=1)
    assert budget.next_step(1)


@pytest.mark.parametrize("batch, least_steps, most_steps", [(1, 10, 30), (12, 1, 3)])
def test_a_step_weighs_as_many_trees_as_it_verified(batch, least_steps, most_steps):
    """A gain measured over a batch's trees is surer than one tree's: after
    an optimistic start, a batch of 12 stops drafting trees that do not pay
    within a step per draft depth (each depth's gain falls when a step
    drafts that deep); at batch 1 the running gain averages more steps.
    Seen at batch 12 on an AVX512 CPU: 14 steps drafted at a loss."""
    budget = trained_budget(ms_per_token=2.0, fixed_ms=40.0, ms_per_branch=0.0)
    fair = FlatTree(TREE.tokens, TREE.parents, TREE.depths, (0.5, 0.3, 0.2, 0.05, 0.1, 0.05))
    poor = FlatTree((1,), (-1,), (1,), (0.02,))
    choose(budget, [BudgetRequest(fair, greedy=True)] * batch, base_tokens=batch)
    assert budget.draft_gain > 1.05
    drafted_steps = 0
    while budget.next_step(batch) and drafted_steps < 100:
        budget.choose([BudgetRequest(poor, greedy=True)] * batch, base_tokens=batch)
        drafted_steps += 1
    assert least_steps <= drafted_steps <= most_steps


def test_calibration_learns_the_acceptance_per_depth_and_kind():
    calibration = AcceptanceCalibration(max_depth=3, decay=1.0)
    chain = FlatTree.chain([1, 2])
    chain = FlatTree(chain.tokens, chain.parents, chain.depths, (0.5, 0.25))
    greedy = BudgetRequest(chain, greedy=True)
    for _ in range(1000):
        # Depth 1 is accepted every time (p said 0.5), depth 2 never.
        calibration.observe(greedy, 2, [0])
    assert calibration.value(greedy, 0) == pytest.approx(1.0, abs=0.01)
    assert calibration.value(greedy, 1) == pytest.approx(0.0, abs=0.01)
    sampled = BudgetRequest(chain, greedy=False)
    assert calibration.value(sampled, 0) == 0.5  # sampled: prior only
    # A lookup path's nodes have no draft probability (0 where the draft
    # did not propose them): their value is their own running acceptance.
    looked_up = BudgetRequest(FlatTree(chain.tokens, chain.parents, chain.depths, (0.5, 0.0)),
                              greedy=True, lookup=frozenset({0, 1}))
    for step in range(1000):
        calibration.observe(looked_up, 2, [0, 1] if step % 4 == 0 else [0])
    assert calibration.value(looked_up, 0) == pytest.approx(1.0, abs=0.01)
    assert calibration.value(looked_up, 1) == pytest.approx(0.25, abs=0.01)
    assert calibration.value(greedy, 1) == pytest.approx(0.0, abs=0.01)  # unchanged


@pytest.mark.parametrize("draft_level_ms, best_levels", [
    ((1.0, 1.0, 1.0), 3),  # cheap levels: the deep nodes pay for theirs
    ((1.0, 20.0, 20.0), 1),  # each further pass costs more than it earns
])
def test_the_draft_depth_follows_what_each_level_costs(draft_level_ms, best_levels):
    # Tokens and branches are free: a tree's value is all it adds, and its
    # draft passes are all it costs.
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_branch=0.0,
                            draft_level_ms=draft_level_ms)
    assert budget.next_step(1) == 3  # every depth is measured first
    budget.choose([BudgetRequest(TREE, greedy=True)], base_tokens=1)
    for _ in range(3):
        assert budget.next_step(1) == best_levels
        budget.choose([BudgetRequest(TREE, greedy=True)], base_tokens=1)
        assert budget.draft_gain > 1.0


@pytest.mark.parametrize("ms_per_tree, draft_level_ms, depths", [
    # Drafting pays 1.85x: plain steps are measured only every
    # MAX_PROBE_INTERVAL steps, as each forgoes nearly half a step's tokens.
    (0.0, (1.0, 20.0, 20.0), [1, 1, 1, 3] * 3),
    # 1.21x: close enough to 1 for the plain step's time to decide.
    (22.0, (1.0, 30.0, 30.0), [1, 1, 0, 3] * 3),
])
def test_while_drafting_pays_deeper_levels_and_plain_steps_are_still_measured(
        ms_per_tree, draft_level_ms, depths):
    """While one level pays best, every probe_interval-th step drafts all
    levels, so that the deeper levels' gains follow the acceptance; where
    the gain is close to 1, every probe_interval-th step drafts nothing, so
    that the plain step the gains are relative to is measured now, not in
    the warm-up."""
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_branch=0.0,
                            ms_per_tree=ms_per_tree, draft_level_ms=draft_level_ms)
    budget.probe_interval = 4
    budget.next_step(1)
    budget.choose([BudgetRequest(TREE, greedy=True)], base_tokens=1)
    drafted = []
    for _ in range(12):
        drafted.append(budget.next_step(1))
        if drafted[-1]:
            budget.choose([BudgetRequest(TREE.subtree(
                [j for j in range(len(TREE)) if TREE.depths[j] <= drafted[-1]]), greedy=True)],
                base_tokens=1)
    assert drafted == depths


def test_a_budget_that_stopped_drafting_learns_from_its_probes():
    """Acceptance (and the cost of trees) is learned only from verified
    nodes. After a warm-up whose trees were all rejected drafting looks
    worthless, and it stops; its probes verify the path to the deepest
    node, the target now accepts the first branch whole, and drafting
    resumes. A probe that verified nothing would learn nothing."""
    budget = trained_budget(ms_per_token=1.0, fixed_ms=40.0, ms_per_branch=0.0)
    budget.probe_interval = 4
    for _ in range(50):
        budget.calibration.observe(BudgetRequest(TREE, greedy=True), len(TREE), [])
    first_branch = {0, 1, 2}
    drafted = []
    for _ in range(300):
        drafted.append(bool(budget.next_step(1)))
        if drafted[-1]:
            kept = budget.choose([BudgetRequest(TREE, greedy=True)], base_tokens=1).kept[0]
            verified = BudgetRequest(TREE.subtree(kept), greedy=True)
            path = [k for k, j in enumerate(kept) if j in first_branch]
            budget.observe_acceptance(verified, len(kept), path)
    assert not any(drafted[1:4])  # stopped: probes only
    assert sum(drafted[-100:]) >= 95  # drafting again


def lookup_offer(tree: FlatTree, path: list[int], match: int = 0) -> BudgetRequest:
    """A greedy request's tree with a context-lookup path added, matched
    in `match_bucket` `match`."""
    tree, lookup = tree.with_path(path)
    return BudgetRequest(tree, greedy=True, lookup=frozenset(lookup), lookup_match=match)


def test_drafting_must_beat_the_lookup_path_alone():
    """A lookup path accepted every time makes the draft's nodes worth
    little beside it: drafting that pays against plain decoding (1.73x at
    two levels) does not pay against the lookup path, which the undrafted
    steps still verify."""
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_branch=0.0,
                            draft_level_ms=(10.0, 10.0, 10.0))
    assert budget.next_step(1) == 3
    budget.choose([BudgetRequest(TREE, greedy=True)], base_tokens=1)
    assert budget.draft_gain == pytest.approx(2.6 / 60 * 40)

    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_branch=0.0,
                            draft_level_ms=(10.0, 10.0, 10.0))
    budget.lookup_depth = 3
    budget.__post_init__()
    assert budget.next_step(1) == 3
    budget.choose([lookup_offer(TREE, [10, 11, 12])], base_tokens=1)
    assert budget.draft_gain < 1.0
    assert budget.next_step(1) == 0
    undrafted = lookup_offer(FlatTree.chain(()), [10, 11, 12])
    assert budget.choose([undrafted], base_tokens=1).kept == [[0, 1, 2]]


def test_a_lookup_path_that_is_never_accepted_is_not_verified():
    budget = trained_budget(ms_per_token=2.0, fixed_ms=40.0)
    budget.lookup_depth = 3
    budget.__post_init__()
    for _ in range(50):
        budget.calibration.observe(lookup_offer(FlatTree.chain(()), [30, 31, 32]), 3, [])
    offer = lookup_offer(TREE, [30, 31])
    kept = choose(budget, [offer], base_tokens=1).kept[0]
    assert kept and not set(kept) & offer.lookup  # the draft's nodes still pay


@pytest.mark.parametrize("batch, verified", [(1, True), (16, False)])
def test_a_lookup_tree_pays_for_the_whole_batchs_step(batch, verified):
    """One request of the batch offers a lookup node accepted 60 % of the
    time, and a tree costs 2 ms beside a 40 ms step: +60 % tokens for +5 %
    time alone, but +4 % tokens (every request's token counts) for +5 %
    time in a batch of 16."""
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_tree=2.0,
                            draft_level_ms=(50.0, 50.0, 50.0))
    budget.lookup_depth = 1
    budget.__post_init__()
    for accepted in [True, True, True, False, False] * 20:
        budget.calibration.observe(lookup_offer(FlatTree.chain(()), [30]), 1,
                                   [0] if accepted else [])
    assert budget.next_step(batch) == 3  # the first step at a batch size measures
    budget.choose([BudgetRequest(TREE, greedy=True)] * batch, base_tokens=batch)
    assert budget.next_step(batch) == 0  # drafting does not pay
    kept = budget.choose([lookup_offer(FlatTree.chain(()), [30])], base_tokens=batch).kept
    assert kept == ([[0]] if verified else [[]])


class FakeClock:
    """`GraphBudget.clock` for a simulated machine: seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1e3


def simulate_undrafted_search(*, tree_ms: float, search_ms: float, accepted: float,
                              step_ms=lambda step: 40.0, batches=lambda step: 16,
                              prompt_tokens_every_step: bool = False,
                              steps: int = 600) -> tuple[GraphBudget, list[bool]]:
    """A batch where drafting never pays and one request offers a one-node
    lookup path, which the cost model prices as worth verifying (a tree at
    0.5 ms, accepted 60 %) whatever it truly costs: verifying it takes
    `tree_ms`, the search `search_ms`, and it is accepted with probability
    `accepted`; a step takes step_ms(step) and 1 ms of noise. Returns the
    budget and, per undrafted step, whether it searched."""
    clock = FakeClock()
    budget = trained_budget(ms_per_token=0.0, fixed_ms=40.0, ms_per_tree=0.5,
                            draft_level_ms=(50.0, 50.0, 50.0))
    budget.clock, budget.lookup_depth, budget.probe_interval = clock, 1, 16
    budget.__post_init__()
    for hit in [True, True, True, False, False] * 20:
        budget.calibration.observe(lookup_offer(FlatTree.chain(()), [30]), 1,
                                   [0] if hit else [])
    rng = np.random.default_rng(0)
    searched = []
    for step in range(steps):
        batch = batches(step)
        verified = None
        if budget.next_step(batch):  # a probe: drafting keeps not paying
            budget.choose([BudgetRequest(TREE, greedy=True)] * batch, base_tokens=batch)
            clock.advance(50.0)
        else:
            searched.append(budget.looks_up)
            if budget.looks_up:
                offer = lookup_offer(FlatTree.chain(()), [30])
                kept = budget.choose([offer], base_tokens=batch).kept
                assert kept == [[0]]  # priced as worth it
                verified = offer
                clock.advance(search_ms)
        if prompt_tokens_every_step:
            budget.break_sequence()
        clock.advance(step_ms(step) + rng.normal(0.0, 1.0)
                      + (tree_ms if verified else 0.0))
        if verified is not None:
            budget.observe_acceptance(verified, 1, [0] if rng.random() < accepted else [])
    return budget, searched


@pytest.mark.parametrize("tree_ms, search_ms, accepted, pays", [
    (0.3, 0.1, 0.8, True),    # +5 % tokens for +1 % time
    (3.0, 0.6, 0.6, False),   # +3.75 % tokens for +9 % time: what the model misses
])
@pytest.mark.parametrize("phase", ["steady", "drifting"])
def test_undrafted_steps_search_the_contexts_while_that_measurably_pays(
        tree_ms, search_ms, accepted, pays, phase):
    """At batch 16 the cost model prices a one-node lookup tree at 0.5 ms
    either way; whether searching pays is measured on consecutive undrafted
    steps, one that searched and one that did not, so a machine drifting
    between 35 and 55 ms steps (far more than the effect) does not decide.
    One undrafted step in `probe_interval` does the opposite, to measure."""
    step_ms = ((lambda step: 40.0) if phase == "steady"
               else lambda step: 45.0 + 10.0 * np.sin(step / 40.0))
    budget, searched = simulate_undrafted_search(
        tree_ms=tree_ms, search_ms=search_ms, accepted=accepted, step_ms=step_ms)
    assert (budget.search_gain > 1.0) == pays
    late = searched[-320:]
    share = sum(late) / len(late)
    assert share > 0.8 if pays else share < 0.2
    assert 0 < share < 1  # the trials


@pytest.mark.parametrize("break_kind", ["prompt tokens", "batch changes"])
def test_steps_that_differ_otherwise_are_no_pair_for_the_search(break_kind):
    """A step with prompt tokens, or with other requests, says nothing of
    the search beside it: no gain is measured, and the undrafted steps keep
    searching, as drafting steps do."""
    budget, searched = simulate_undrafted_search(
        tree_ms=3.0, search_ms=0.6, accepted=0.6, steps=200,
        prompt_tokens_every_step=break_kind == "prompt tokens",
        batches=(lambda step: 16) if break_kind == "prompt tokens"
        else lambda step: 9 + step % 2)  # the same power-of-two bucket
    assert budget.search_gain is None
    assert all(searched)


def test_the_first_tree_of_a_step_costs_more_than_the_next():
    """The batch leaves vLLM's decode path with its first tree: the cost
    model prices one tree and sixteen each as the hardware does. Trained as
    the warm-up does, on steps that alternate with and without trees."""
    costs = StepCostModel()
    rng = np.random.default_rng(4)
    for step in range(200):
        trees = int(rng.integers(1, 17)) if step % 2 else 0
        shape = StepShape(16 + trees * int(rng.integers(1, 4)), trees)
        costs.observe_target(shape, 30.0 + 0.1 * shape.tokens + 0.5 * trees
                             + 5.0 * (trees > 0) + rng.normal(0, 0.3))
    shapes = [StepShape(16), StepShape(17, trees=1), StepShape(32, trees=16)]
    predicted = costs.step_ms_each(np.array([s.as_array() for s in shapes]))
    assert predicted == pytest.approx([31.6, 37.2, 46.2], abs=0.5)


def noisy_costs(plain_every: int, seed: int) -> StepCostModel:
    """Steps of batch 16 that cost 80 ms plain, +13 ms for their first tree
    and 2.3 ms per tree row, with 5 ms of noise; every `plain_every`-th step
    has no tree."""
    costs = StepCostModel()
    rng = np.random.default_rng(seed)
    for step in range(400):
        trees = 0 if step % plain_every == 0 else int(rng.integers(1, 7))
        shape = StepShape(16 + 3 * trees, trees)
        costs.observe_target(shape, 80.0 + 2.3 * 3 * trees + 10.7 * (trees > 0)
                             + rng.normal(0, 5.0))
    return costs


def test_a_rarely_measured_tree_cost_is_priced_high():
    """Where plain steps are rare, the extra time of a step's first tree is
    poorly measured: priced against the plain step, it gets a margin of
    its standard error, which shrinks as plain steps become common and
    never more than doubles the predicted extra time."""
    plain, tree = StepShape(16), StepShape(19, trees=1)
    shapes = np.array([plain.as_array(), tree.as_array()])

    def extra_ms(costs: StepCostModel, reference: np.ndarray | None) -> float:
        plain_ms, tree_ms = costs.step_ms_each(shapes, reference)
        return tree_ms - plain_ms

    margins, spreads = {}, {}
    for plain_every in (2, 40):
        runs = [noisy_costs(plain_every, seed) for seed in range(8)]
        predicted = [extra_ms(c, None) for c in runs]
        priced = [extra_ms(c, plain.as_array()) for c in runs]
        assert all(p < q <= 2 * p for p, q in zip(predicted, priced))
        margins[plain_every] = np.mean(np.subtract(priced, predicted))
        spreads[plain_every] = np.std(predicted)  # over the runs: the real error
    assert margins[40] > 2 * margins[2]
    for plain_every, margin in margins.items():
        assert 0.5 < margin / spreads[plain_every] < 2
    # Without a reference, or for the reference itself, no margin.
    costs = noisy_costs(40, 0)
    assert costs.step_ms_each(shapes[:1], plain.as_array()) == pytest.approx(
        costs.step_ms_each(shapes[:1]))


def test_a_tree_is_never_priced_faster_than_the_step_without_it():
    """Noise or a phase can fit a tree's extra time below zero; priced
    against the step without it, the tree then costs nothing, not less."""
    costs = StepCostModel()
    rng = np.random.default_rng(5)
    for step in range(200):
        trees = step % 2
        costs.observe_target(StepShape(16 + trees, trees),
                             40.0 - 2.0 * trees + rng.normal(0, 0.3))
    plain, tree = StepShape(16), StepShape(17, trees=1)
    shapes = np.array([plain.as_array(), tree.as_array()])
    fitted_plain, fitted_tree = costs.step_ms_each(shapes)
    assert fitted_tree < fitted_plain - 1.0  # the fit says the tree saves time
    priced_plain, priced_tree = costs.step_ms_each(shapes, plain.as_array())
    assert priced_plain == pytest.approx(fitted_plain)
    assert priced_tree == pytest.approx(priced_plain)


def test_standard_errors_follow_the_residuals_and_the_excitation():
    fit = RecursiveLeastSquares(2, 1.0, np.zeros(2), 1e4)
    rng = np.random.default_rng(1)
    for _ in range(400):
        x = np.array([1.0, rng.normal()])
        fit.update(x, 3.0 + 2.0 * x[1] + rng.normal(0, 1.0))
    se = fit.standard_errors(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    # Ordinary least squares' standard errors: 1 / sqrt(400) for both.
    assert se == pytest.approx([0.05, 0.05, 0.05], rel=0.25)


def test_lookup_paths_are_priced_by_the_length_that_matched():
    """Paths after long matches are accepted, after short ones not: at
    batch 16 where a tree row costs half a token's share of the step, the
    budget verifies the long match's path alone."""
    budget = trained_budget(ms_per_token=2.5, fixed_ms=40.0)
    budget.lookup_depth = 3
    budget.__post_init__()
    for _ in range(100):
        budget.calibration.observe(lookup_offer(FlatTree.chain(()), [30, 31, 32], 0), 3, [])
        budget.calibration.observe(lookup_offer(FlatTree.chain(()), [30, 31, 32], 4), 3,
                                   [0, 1, 2])
    short = lookup_offer(FlatTree.chain(()), [40, 41, 42], 0)
    long = lookup_offer(FlatTree.chain(()), [50, 51, 52], 4)
    undrafted = [BudgetRequest(FlatTree.chain(()), greedy=True) for _ in range(14)]
    budget.next_step(16)
    kept = budget.choose([short, long, *undrafted], base_tokens=16).kept
    assert kept[:2] == [[], [0, 1, 2]]
