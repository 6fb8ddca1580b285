"""The rollout planner, transition by transition, on the test cluster of rollout_sim.py.

Each row is (phase, step, canaryWeight, replicas per revision, weight per revision) after one
reconcile; between reconciles the pods start (or not) and the clock moves.
"""

import pytest
from kvpilot.operator.api import AnalysisResult, RolloutSpec
from kvpilot.operator.rollout.planner import Commands, canary_steps
from kvpilot.operator.rollout.replicas import shift_replicas, split_replicas

from tests.operator.rollout_sim import Sim

CANARY = {
    "strategy": "Canary",
    "steps": [{"weight": 10, "pause": "5m"}, {"weight": 50, "pause": "10m"}, {"weight": 100}],
}


def spec(**fields) -> RolloutSpec:
    return RolloutSpec.model_validate(fields)


def started(sim: Sim, stable: str = "a") -> Sim:
    sim.tick(stable)
    sim.min_ready_seen = None
    return sim


def check(
    result: AnalysisResult | None = None, passed: bool | None = True, minute: int = 0
) -> AnalysisResult:
    return AnalysisResult(
        time=f"2026-12-01T12:{minute:02d}:00Z",
        requests=100,
        error_rate=0.5 if passed is False else 0.0,
        ttft_p95=0.2,
        passed=passed,
        message="100 requests, error rate 0.500" if passed is False else "passed",
    )


def test_first_revision_is_stable_at_once():
    sim = Sim(spec(**CANARY), total=2)
    plan = sim.tick("a")
    assert sim.row(plan) == ("Promoted", None, 0, {"a": 2}, {"a": 100})
    assert plan.status.stable_revision == "a"
    assert [e.reason for e in plan.events] == ["FirstRevision"]


def test_canary_walks_every_step_then_promotes_and_retires_the_old_revision():
    sim = started(Sim(spec(**CANARY), total=4))
    rows = []
    for _ in range(8):
        plan = sim.tick("b")
        rows.append((*sim.row(plan), plan.status.reason, plan.delete))
        sim.advance(plan.requeue_after or 60)
    assert rows == [
        # The canary's pod starts at weight 0; the stable revision keeps all its pods.
        ("Progressing", 0, 0, {"a": 4, "b": 1}, {"a": 100, "b": 0}, "WaitingForReplicas", []),
        # ceil(4 * 10%) = 1 canary pod, ceil(4 * 90%) = 4 stable pods: the weight is set, the pause runs.
        ("Progressing", 0, 10, {"a": 4, "b": 1}, {"a": 90, "b": 10}, "StepPause", []),
        # 5m later, step 2: 2 + 2, but the stable side gives a pod only once the canary has its 2.
        ("Progressing", 1, 10, {"a": 3, "b": 2}, {"a": 90, "b": 10}, "WaitingForReplicas", []),
        ("Progressing", 1, 50, {"a": 2, "b": 2}, {"a": 50, "b": 50}, "StepPause", []),
        ("Progressing", 2, 50, {"a": 2, "b": 4}, {"a": 50, "b": 50}, "WaitingForReplicas", []),
        # All four canary pods ready: 100%, promoted, the old revision scaled to 0 ...
        ("Promoted", None, 0, {"b": 4, "a": 0}, {"b": 100, "a": 0}, "Promoted", []),
        # ... and its Deployment deleted once at 0.
        ("Promoted", None, 0, {"b": 4}, {"b": 100}, "Promoted", ["a"]),
        ("Promoted", None, 0, {"b": 4}, {"b": 100}, "Promoted", []),
    ]
    assert sim.min_ready_seen == 4  # never below the desired count
    assert [(h.phase, h.reason) for h in sim.status.history] == [
        ("Promoted", "FirstRevision"),
        ("Progressing", "RolloutStarted"),
        ("Progressing", "StepReached"),
        ("Progressing", "StepReached"),
        ("Progressing", "StepReached"),
        ("Promoted", "Promoted"),
    ]
    assert sim.status.stable_revision == "b"


def test_a_timed_pause_holds_until_it_is_over():
    sim = started(Sim(spec(**CANARY), total=2))
    sim.tick("b")
    plan = sim.tick("b")
    assert (plan.status.step, plan.status.canary_weight, plan.requeue_after) == (0, 10, 300)
    sim.advance(299)
    plan = sim.tick("b")
    assert (plan.status.step, plan.status.reason, plan.requeue_after) == (0, "StepPause", 1)
    sim.advance(1)
    assert sim.tick("b").status.step == 1


def test_manual_pause_waits_for_a_promote_of_this_step_only():
    sim = started(Sim(spec(strategy="Canary", steps=[{"weight": 20, "pause": "manual"}]), total=2))
    sim.tick("b")
    plan = sim.tick("b")
    assert sim.row(plan)[:3] == ("Paused", 0, 20)
    assert plan.status.reason == "AwaitingPromote"
    sim.advance(3600)
    # A promote given for another revision or another step is stale: nothing moves.
    for stale in ("x/0", "b/1"):
        assert sim.tick("b", commands=sim.commands(promote=stale)).status.phase == "Paused"
    plan = sim.tick("b", commands=sim.commands(promote="b/0"))
    # The last step (100%): the whole count at once, the stable side keeping 2 ready meanwhile.
    assert sim.row(plan) == ("Progressing", 1, 20, {"a": 1, "b": 2}, {"a": 80, "b": 20})
    plan = sim.tick("b", commands=sim.commands(promote="b/0"))  # the same annotation, still there
    assert sim.row(plan)[0] == "Promoted"


def test_promote_full_skips_to_the_last_step():
    sim = started(Sim(spec(**CANARY), total=2))
    sim.tick("b")
    sim.tick("b")
    plan = sim.tick("b", commands=sim.commands(promote="b/full"))
    assert plan.status.step == 2 and plan.status.reason == "WaitingForReplicas"
    assert sim.tick("b", commands=sim.commands(promote="b/full")).status.phase == "Promoted"


def test_spec_paused_holds_the_step():
    sim = started(Sim(spec(**CANARY, paused=True), total=2))
    sim.tick("b")
    sim.advance(3600)
    plan = sim.tick("b")
    assert (plan.status.phase, plan.status.reason, plan.status.step) == ("Paused", "PausedBySpec", 0)
    sim.spec = spec(**CANARY)
    assert sim.tick("b").status.phase == "Progressing"


def test_a_paused_rollout_runs_no_progress_deadline_and_counts_it_again_from_the_resume():
    """As a paused Deployment: a new revision short of pods is not rolled back while paused (it was,
    after progressDeadline), and the deadline starts again when the pause ends."""
    sim = started(Sim(spec(**CANARY, paused=True, progressDeadline="10m"), total=2, broken={"b"}))
    sim.tick("b")
    sim.advance(3600)
    assert sim.tick("b").status.phase == "Progressing"  # still waiting for b's pod, not rolled back
    sim.spec = spec(**CANARY, progressDeadline="10m")
    sim.advance(599)
    assert sim.tick("b").status.phase == "Progressing"
    sim.advance(2)
    assert sim.tick("b").status.reason == "ProgressDeadlineExceeded"


ANALYSIS = {**CANARY, "analysis": {"interval": "1m", "maxErrorRate": 0.02, "failureLimit": 2}}


def test_failed_analysis_checks_in_a_row_roll_back():
    sim = started(Sim(spec(**ANALYSIS), total=2))
    sim.tick("b")
    sim.tick("b")  # 10%: checks start
    assert sim.tick("b", analysis=check(passed=False)).status.failed_checks == 1
    assert sim.tick("b", analysis=check(passed=True)).status.failed_checks == 0  # a pass resets
    assert sim.tick("b", analysis=check(passed=False)).status.failed_checks == 1
    assert sim.tick("b", analysis=check(passed=None)).status.failed_checks == 1  # inconclusive: no change
    plan = sim.tick("b", analysis=check(passed=False))
    assert sim.row(plan) == ("RolledBack", 0, 0, {"a": 2, "b": 0}, {"a": 100, "b": 0})
    assert plan.status.reason == "AnalysisFailed"
    assert "2 failed analysis checks in a row" in plan.status.message
    assert "error rate 0.500" in plan.status.message  # the failed check's numbers
    assert plan.status.last_analysis.passed is False
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "AnalysisFailed")]
    assert plan.revisions["b"].phase == "Failed" and plan.revisions["a"].phase == "Active"
    # It stays rolled back (no new Event) until the spec changes.
    sim.advance(3600)
    plan = sim.tick("b")
    assert sim.row(plan) == ("RolledBack", 0, 0, {"a": 2, "b": 0}, {"a": 100, "b": 0})
    assert plan.events == []
    plan = sim.tick("c")
    assert (plan.status.phase, plan.status.stable_revision, plan.status.revision) == ("Progressing", "a", "c")
    assert plan.delete == ["b"] and "b" not in plan.revisions  # already at 0: its Deployment goes


def test_without_auto_rollback_a_failed_rollout_is_held():
    sim = started(Sim(spec(**ANALYSIS, autoRollback=False), total=2))
    sim.tick("b")
    sim.tick("b")
    sim.tick("b", analysis=check(passed=False))
    plan = sim.tick("b", analysis=check(passed=False))
    assert sim.row(plan) == ("Failed", 0, 10, {"a": 2, "b": 1}, {"a": 90, "b": 10})
    plan = sim.tick("b", commands=sim.commands(abort="b"))
    assert sim.row(plan) == ("RolledBack", 0, 0, {"a": 2, "b": 0}, {"a": 100, "b": 0})


def test_a_model_that_never_loads_rolls_back_after_the_progress_deadline():
    sim = started(Sim(spec(**CANARY, progressDeadline="10m"), total=2))
    sim.broken.add("b")
    plan = sim.tick("b")
    assert plan.requeue_after == 600
    sim.advance(599)
    assert sim.tick("b").status.phase == "Progressing"
    sim.advance(1)
    plan = sim.tick("b")
    assert sim.row(plan) == ("RolledBack", 0, 0, {"a": 2, "b": 0}, {"a": 100, "b": 0})
    assert plan.status.reason == "ProgressDeadlineExceeded"
    assert "made no progress for 10m (0 ready): CrashLoopBackOff" in plan.status.message
    assert sim.min_ready_seen == 2


def test_abort_rolls_back_and_a_stale_abort_does_nothing():
    sim = started(Sim(spec(**CANARY), total=2))
    sim.tick("b")
    assert sim.tick("b", commands=sim.commands(abort="x")).status.phase == "Progressing"
    plan = sim.tick("b", commands=sim.commands(abort="b"))
    assert (plan.status.phase, plan.status.reason) == ("RolledBack", "Aborted")


MANUAL = {
    "strategy": "Canary",
    "steps": [{"weight": 10, "pause": "manual"}, {"weight": 50, "pause": "manual"}],
}


def test_a_command_applies_only_to_the_rollout_it_was_given_for():
    """Annotations stay on the object and a revision's hash comes back with its spec: an abort and
    a `promote --full` given during one rollout of b do nothing to the next rollout of b."""
    sim = started(Sim(spec(**MANUAL), total=4))
    sim.tick("b")
    sim.advance(60)
    given = Commands(promote=sim.commands(promote="b/full").promote, abort=sim.commands(abort="b").abort)
    plan = sim.tick("b", commands=given)
    assert (plan.status.phase, plan.status.reason) == ("RolledBack", "Aborted")
    sim.advance(60)
    assert sim.tick("a", commands=given).status.reason == "BackToStable"
    sim.advance(60)
    rows = []
    for _ in range(3):  # the retry of b, with both annotations still there
        plan = sim.tick("b", commands=given)
        rows.append((*sim.row(plan), plan.status.reason))
        sim.advance(60)
    assert rows == [
        ("Progressing", 0, 0, {"a": 4, "b": 1}, {"a": 100, "b": 0}, "WaitingForReplicas"),
        ("Paused", 0, 10, {"a": 4, "b": 1}, {"a": 90, "b": 10}, "AwaitingPromote"),
        ("Paused", 0, 10, {"a": 4, "b": 1}, {"a": 90, "b": 10}, "AwaitingPromote"),
    ]
    # One given for this rollout acts; one naming no rollout (an older CLI, by hand) does not.
    assert sim.tick("b", commands=Commands(promote="b/0", abort="b")).status.phase == "Paused"
    assert sim.tick("b", commands=sim.commands(promote="b/0")).status.step == 1


def test_rolling_replaces_pod_by_pod_with_weights_following_ready_pods():
    sim = started(Sim(spec(), total=3))
    rows = [sim.row(sim.tick("b")) for _ in range(5)]
    assert rows == [
        ("Progressing", None, 0, {"a": 3, "b": 1}, {"a": 100, "b": 0}),
        ("Progressing", None, 33, {"a": 2, "b": 2}, {"a": 67, "b": 33}),
        ("Progressing", None, 67, {"a": 1, "b": 3}, {"a": 33, "b": 67}),
        ("Promoted", None, 0, {"b": 3, "a": 0}, {"b": 100, "a": 0}),
        ("Promoted", None, 0, {"b": 3}, {"b": 100}),
    ]
    assert sim.min_ready_seen == 3


@pytest.mark.parametrize("total", [2, 3, 4])
def test_unschedulable_new_pods_switch_to_in_place_never_both_at_zero_ready(total):
    sim = started(Sim(spec(), total=total, capacity=total))
    sim.tick("b")
    assert sim.pending_since.get("b") is not None  # no GPU left for the surge pod
    plan = sim.tick("b")
    assert plan.requeue_after == 120  # capacityTimeout
    sim.advance(119)
    assert sim.tick("b").status.capacity_mode == "Surge"
    sim.advance(1)
    plan = sim.tick("b")
    assert plan.status.capacity_mode == "InPlace"
    assert "Unschedulable for 120s: 0/1 nodes are available" in plan.status.capacity_reason
    for _ in range(2 * total):
        if plan.status.phase == "Promoted":
            break
        assert sum(sim.replicas.values()) <= total  # never more pods than GPUs
        plan = sim.tick("b")
    assert plan.status.phase == "Promoted"
    assert sim.min_ready_seen >= total - 1  # one pod at a time, never both revisions at zero ready


def test_in_place_with_one_replica_keeps_the_stable_pod_and_says_why():
    sim = started(Sim(spec(capacity="InPlace", progressDeadline="5m"), total=1, capacity=1))
    plan = sim.tick("b")
    assert sim.row(plan) == ("Progressing", None, 0, {"a": 1, "b": 0}, {"a": 100, "b": 0})
    assert "never takes the last ready stable pod" in plan.status.message
    sim.advance(300)
    plan = sim.tick("b")
    assert plan.status.phase == "RolledBack" and sim.min_ready_seen == 1


def test_blue_green_scales_a_full_preview_at_weight_zero_then_switches_at_once():
    sim = started(Sim(spec(strategy="BlueGreen"), total=2))
    plan = sim.tick("b")
    assert sim.row(plan) == ("Progressing", None, 0, {"a": 2, "b": 2}, {"a": 100, "b": 0})
    assert plan.status.reason == "PreviewScaling"
    plan = sim.tick("b")
    assert sim.row(plan) == ("Paused", None, 0, {"a": 2, "b": 2}, {"a": 100, "b": 0})
    assert plan.status.reason == "AwaitingPromote"
    plan = sim.tick("b", commands=sim.commands(promote="b/0"))
    assert sim.row(plan) == ("Promoted", None, 0, {"b": 2, "a": 0}, {"b": 100, "a": 0})


BLUE_GREEN_ANALYSIS = {
    "strategy": "BlueGreen",
    "analysis": {"interval": "1m", "maxTTFTSeconds": {"p95": 2.0}, "failureLimit": 2},
}


def test_blue_green_checks_the_preview_and_failed_checks_roll_back_before_the_promote():
    sim = started(Sim(spec(**BLUE_GREEN_ANALYSIS), total=2))
    sim.tick("b")
    plan = sim.tick("b", analysis=check(passed=True))
    assert (plan.status.reason, plan.requeue_after) == ("AwaitingPromote", 60)
    sim.advance(30)
    assert sim.tick("b").requeue_after == 30  # at weight 0, the next check is still due on time
    sim.advance(30)
    assert sim.tick("b", analysis=check(passed=False, minute=1)).status.failed_checks == 1
    sim.advance(60)
    # The second failed check wins over a promote given meanwhile: no traffic ever reached b.
    plan = sim.tick("b", analysis=check(passed=False, minute=2), commands=sim.commands(promote="b/0"))
    assert sim.row(plan) == ("RolledBack", None, 0, {"a": 2, "b": 0}, {"a": 100, "b": 0})
    assert plan.status.reason == "AnalysisFailed"


AT_ZERO = [
    {"strategy": "Rolling"},
    {"strategy": "Canary", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}]},
    {"strategy": "BlueGreen"},
]


@pytest.mark.parametrize("fields", AT_ZERO, ids=lambda f: f["strategy"])
def test_at_zero_replicas_a_revision_that_never_gets_ready_is_rolled_back_not_promoted(fields):
    """Scaled to zero (the autoscaler's total is 0): the new revision still gets one pod, and is
    promoted only once it is ready; a broken one is rolled back, the old one kept to serve."""
    sim = started(Sim(spec(**fields, progressDeadline="10m"), total=0, broken={"b"}))
    rows = set()
    for _ in range(12):
        plan = sim.tick("b", commands=sim.commands(promote="b/0") if sim.status.revision == "b" else None)
        rows.add((plan.status.phase, plan.revisions["a"].replicas, plan.revisions["b"].replicas))
        if plan.status.phase == "RolledBack":
            break
        sim.advance(60)
    assert rows <= {("Progressing", 0, 1), ("Paused", 0, 1), ("RolledBack", 0, 0)}
    assert (plan.status.phase, plan.status.reason) == ("RolledBack", "ProgressDeadlineExceeded")
    assert plan.revisions["a"].weight == 100 and "a" not in plan.delete


@pytest.mark.parametrize("fields", AT_ZERO, ids=lambda f: f["strategy"])
def test_at_zero_replicas_the_new_revision_is_promoted_once_its_one_pod_was_ready(fields):
    sim = started(Sim(spec(**fields), total=0, broken={"b"}))
    plan = sim.tick("b")
    assert (plan.revisions["a"].replicas, plan.revisions["b"].replicas) == (0, 1)
    sim.broken.clear()
    for _ in range(6):
        sim.advance(60)
        plan = sim.tick("b", commands=sim.commands(promote="b/0"))
        if plan.status.phase == "Promoted":
            break
        assert (plan.revisions["a"].replicas, plan.revisions["b"].replicas) == (0, 1)
    # Back at the autoscaler's 0; the old revision, at 0 already, is retired.
    assert sim.row(plan) == ("Promoted", None, 0, {"b": 0}, {"b": 100})
    assert plan.delete == ["a"]


def test_traffic_waking_the_model_mid_rollout_gives_the_stable_revision_its_pod_too():
    """Requests wake the model (the autoscaler's total 0 -> 1) before the new revision is ready:
    the stable revision, known to work, gets its pod and takes the traffic meanwhile."""
    sim = started(Sim(spec(), total=0, broken={"b"}))
    assert sim.row(sim.tick("b"))[3] == {"a": 0, "b": 1}
    sim.total = 1
    plan = sim.tick("b")
    assert sim.row(plan) == ("Progressing", None, 0, {"a": 1, "b": 1}, {"a": 100, "b": 0})
    sim.broken.clear()
    sim.tick("b")
    assert sim.row(sim.tick("b")) == ("Promoted", None, 0, {"b": 1, "a": 0}, {"b": 100, "a": 0})


def test_a_spec_change_mid_rollout_retires_the_middle_revision_and_the_newest_wins():
    sim = started(Sim(spec(**CANARY), total=2))
    sim.tick("b")
    sim.tick("b")
    plan = sim.tick("c")
    assert sim.row(plan) == ("Progressing", 0, 0, {"a": 2, "c": 1, "b": 0}, {"a": 100, "c": 0, "b": 0})
    assert plan.status.stable_revision == "a"
    assert "b, still rolling out, is retired" in plan.status.history[-1].message
    plan = sim.tick("c")
    assert plan.delete == ["b"] and sim.row(plan)[2] == 10
    # Back to the stable revision's spec: the rollout ends there.
    plan = sim.tick("a")
    assert sim.row(plan) == ("Promoted", None, 0, {"a": 2, "c": 0}, {"a": 100, "c": 0})
    assert plan.status.reason == "BackToStable"


def test_a_restarted_operator_carries_on_from_the_status_alone():
    sim = started(Sim(spec(**CANARY), total=2))
    sim.tick("b")
    sim.tick("b")  # step 1 reached, its 5m pause running
    sim.advance(180)
    # A new operator: nothing but the object's status (JSON) and the cluster's Deployments.
    restarted = Sim(spec(**CANARY), total=2, now=sim.now, replicas=dict(sim.replicas), ready=dict(sim.ready))
    restarted.status = type(sim.status).model_validate_json(sim.status.model_dump_json(by_alias=True))
    plan = restarted.tick("b")
    assert (plan.status.step, plan.status.reason, plan.requeue_after) == (0, "StepPause", 120)
    assert plan.events == []  # no transition repeated


def test_canary_steps_end_at_100():
    assert [s.weight for s in canary_steps(spec(strategy="Canary", steps=[{"weight": 30}]))] == [30, 100]
    assert [s.weight for s in canary_steps(spec(**CANARY))] == [10, 50, 100]


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (4, {"a": 90, "b": 10}, {"a": 4, "b": 1}),
        (4, {"a": 50, "b": 50}, {"a": 2, "b": 2}),
        (10, {"a": 75, "b": 25}, {"a": 8, "b": 3}),
        (1, {"a": 99, "b": 1}, {"a": 1, "b": 1}),
        (3, {"a": 100, "b": 0}, {"a": 3, "b": 0}),
        (0, {"a": 50, "b": 50}, {"a": 0, "b": 0}),
        (5, {"stable": 100}, {"stable": 5}),  # no rollout: the serving revision takes all
        (5, {"stable": 80, "canary": 20}, {"stable": 4, "canary": 1}),
        (3, {"stable": 50, "canary": 50}, {"stable": 2, "canary": 2}),  # Surge: one over the total
        (1, {"stable": 90, "canary": 10}, {"stable": 1, "canary": 1}),  # a canary never at 0 pods
        (4, {"a": 0, "b": 0}, {"a": 0, "b": 0}),
        (3, {}, {}),
    ],
)
def test_split_replicas_gives_each_weighted_revision_its_ceiling(total, weights, expected):
    assert split_replicas(total, weights) == expected


def test_shift_in_place_waits_for_the_pod_on_its_way():
    goal = {"new": 4, "stable": 0}
    shift = shift_replicas(
        4, goal, new_replicas=2, new_ready=1, stable_ready=2, mode="InPlace", one_at_a_time=True
    )
    assert (shift.new, shift.stable) == (2, 2)
    shift = shift_replicas(
        4, goal, new_replicas=2, new_ready=2, stable_ready=2, mode="InPlace", one_at_a_time=True
    )
    assert (shift.new, shift.stable) == (3, 1)


def test_after_a_promote_the_next_step_times_its_own_pause():
    # The step before left stepReachedAt in the stored status: the write that clears it must
    # remove it there (a merge patch keeps a key it does not mention).
    steps = [{"weight": 50, "pause": "manual"}, {"weight": 100, "pause": "30s"}]
    sim = started(Sim(spec(strategy="Canary", steps=steps), total=2))
    sim.tick("b")
    sim.tick("b")
    sim.advance(600)
    sim.tick("b", commands=sim.commands(promote="b/0"))
    plan = sim.tick("b", commands=sim.commands(promote="b/0"))
    assert (plan.status.step, plan.status.canary_weight, plan.status.reason) == (1, 100, "StepPause")
    assert plan.requeue_after == 30
    sim.advance(30)
    assert sim.tick("b").status.phase == "Promoted"
    reasons = [h.reason for h in sim.status.history]
    assert reasons[-3:] == ["WaitingForReplicas", "StepReached", "Promoted"]
