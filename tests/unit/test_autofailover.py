"""The automatic failover rules (consistency/autofailover.py) with a fake clock and a fake world.

Three controllers share one fake etcd (verdicts, mode, last failover, one lock per shard) and
probe one fake set of servers (tests.fixtures.fakes, the fake that keeps the ControllerIO
contract of tests/contracts/test_controller_io.py); time only moves when a test moves it.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace

import pytest

from consistency import autofailover as af
from tests.fixtures.fakes import FAKE_VIEW, ControllerWorld, FakeControllerIO

REGIONS = ("a", "b", "c")
CFG = af.Config(detection_s=2.0, anti_flap_s=60.0, verdict_stale_s=1.0, verdict_heartbeat_s=0.5)
VIEW = FAKE_VIEW


def sv(down: float | None, *, sb_down: float | None = None, rec: bool = False) -> af.ShardVerdict:
    return af.ShardVerdict("s-1@a", 1, down, rec, "s-1@b", sb_down)


def verdicts(*downs: float | None, **kw: float | None) -> dict[str, af.Verdict]:
    return {
        r: af.Verdict(r, 1, {"s-1": sv(d, **kw)})  # type: ignore[arg-type]
        for r, d in zip(REGIONS, downs, strict=False)
    }


def decide(vs: dict[str, af.Verdict], view: af.ShardView = VIEW, **kw: object) -> af.Decision:
    args: dict[str, object] = {
        "regions_total": 3,
        "mode_on": True,
        "last_failover_at": None,
        "now_wall": 1000.0,
        "cfg": CFG,
    }
    args.update(kw)
    return af.decide(view, vs, **args)  # type: ignore[arg-type]


def test_a_majority_of_all_regions_for_the_detection_time() -> None:
    assert decide(verdicts(None, None, None)).reason is af.Reason.HEALTHY
    # One region alone (a partitioned one) is never enough, however long.
    d = decide(verdicts(None, None, 99.0))
    assert (d.action, d.reason) == (af.Action.NONE, af.Reason.SUSPECTED)
    # Two regions, but one below the detection time.
    assert decide(verdicts(None, 1.99, 5.0)).action is af.Action.NONE
    d = decide(verdicts(None, 2.0, 5.0))
    assert (d.action, d.target_region) == (af.Action.FAILOVER, "b")
    # Regions that publish nothing still count in the total: two verdicts of a 5-region
    # deployment are not a majority.
    assert decide(verdicts(3.0, 3.0), regions_total=5).action is af.Action.NONE
    assert decide(verdicts(3.0, 3.0, 3.0), regions_total=5).action is af.Action.FAILOVER


def test_verdicts_about_another_primary_or_epoch_do_not_count() -> None:
    vs = verdicts(5.0, 5.0, 5.0)
    moved = replace(VIEW, epoch=2)
    assert decide(vs, moved).reason is af.Reason.HEALTHY
    other = replace(VIEW, primary="s-1@c")
    assert decide(vs, other).reason is af.Reason.HEALTHY


def test_off_anti_flap_and_refusals() -> None:
    vs = verdicts(3.0, 3.0, 3.0)
    assert decide(vs, mode_on=False).reason is af.Reason.DISABLED
    d = decide(vs, last_failover_at=1000.0 - 59.0)
    assert (d.action, d.reason) == (af.Action.NONE, af.Reason.ANTI_FLAP)
    assert decide(vs, last_failover_at=1000.0 - 61.0).action is af.Action.FAILOVER
    d = decide(vs, replace(VIEW, region_survival=False))
    assert (d.action, d.reason) == (af.Action.NONE, af.Reason.REFUSED)
    assert "REFUSED" in d.detail
    d = decide(vs, replace(VIEW, standby=None, standby_region=None))
    assert d.reason is af.Reason.REFUSED
    # Primary and synchronous standby both unreachable from the majority: no promotion.
    d = decide(verdicts(3.0, 3.0, 3.0, sb_down=3.0))
    assert (d.action, d.reason) == (af.Action.NONE, af.Reason.REFUSED)


def test_unfinished_promotion_is_finished_even_inside_the_window() -> None:
    vs = verdicts(3.0, 3.0, None, rec=True)
    d = decide(vs, replace(VIEW, region_survival=False), last_failover_at=999.0)
    assert (d.action, d.reason) == (af.Action.FINISH, af.Reason.PROMOTION_UNFINISHED)


def test_lost_standby_degrades_and_a_returning_one_restores() -> None:
    d = decide(verdicts(None, None, None, sb_down=2.5))
    assert (d.action, d.reason) == (af.Action.DEGRADE, af.Reason.STANDBY_LOST)
    assert decide(verdicts(None, None, None, sb_down=1.0)).action is af.Action.NONE
    assert decide(verdicts(None, None, None, sb_down=2.5), mode_on=False).action is af.Action.NONE
    degraded = replace(VIEW, region_survival=False)
    d = decide(verdicts(None, None, None), degraded)
    assert (d.action, d.reason) == (af.Action.RESTORE, af.Reason.STANDBY_BACK)


def test_freshness_ignores_a_verdict_that_stopped_moving() -> None:
    f = af.Freshness(1.0)
    v1 = af.Verdict("a", 1, {})
    assert "a" in f.fresh([v1], 0.0)
    assert "a" in f.fresh([v1], 0.9)
    assert "a" not in f.fresh([v1], 1.1)
    assert "a" in f.fresh([af.Verdict("a", 2, {})], 1.2)


def test_down_time_restarts_at_every_success() -> None:
    t = af.DownTracker()
    k = ("primary", "s-1@a", 1)
    bad, good = af.Probe(False), af.Probe(True)
    assert t.observe(k, bad, 0.0, 1.0, want_primary=True) == 1.0
    assert t.observe(k, bad, 1.25, 1.9, want_primary=True) == 1.9
    assert t.observe(k, good, 2.0, 2.0, want_primary=True) is None
    assert t.observe(k, bad, 2.25, 3.0, want_primary=True) == 0.75
    # A "primary" in recovery serves no writes: down. A standby in recovery is fine.
    rec = af.Probe(True, in_recovery=True)
    assert t.observe(("primary", "x", 1), rec, 0.0, 0.5, want_primary=True) == 0.5
    assert t.observe(("standby", "y", 1), rec, 0.0, 0.5, want_primary=False) is None


# -- three controllers over one fake world -------------------------------------------------------


def controllers(w: ControllerWorld) -> list[af.Controller]:
    return [af.Controller(FakeControllerIO(w, r), regions_total=3, cfg=CFG) for r in REGIONS]


async def run_for(
    w: ControllerWorld, cs: list[af.Controller], seconds: float, step: float = 0.25
) -> None:
    end = w.now + seconds
    while w.now < end:
        # All three concurrently, as separate processes would.
        await asyncio.gather(*(c.round(1000.0 + w.now, lambda: w.now) for c in cs))
        w.now += step


async def test_killed_primary_fails_over_once_within_detection_plus_a_round() -> None:
    w = ControllerWorld()
    cs = controllers(w)
    await run_for(w, cs, 1.0)
    w.down.add("s-1@a")
    killed = w.now
    while not w.actions and w.now < killed + 10:
        await run_for(w, cs, 0.25)
    # The lock and the re-read: three controllers decided, exactly one acted.
    assert len(w.actions) == 1, w.actions
    assert w.view.epoch == 2
    assert CFG.detection_s <= w.now - killed <= CFG.detection_s + 0.75
    await run_for(w, cs, 5.0)
    assert len(w.actions) == 1
    assert any(d.reason is af.Reason.DONE for d in w.decisions)


async def test_one_cut_off_region_never_triggers() -> None:
    w = ControllerWorld(cut={("c", "s-1@a")})
    await run_for(w, controllers(w), 10.0)
    assert w.actions == []
    assert any(d.reason is af.Reason.SUSPECTED for d in w.decisions)


async def test_pauses_below_the_detection_time_never_trigger() -> None:
    w = ControllerWorld()
    cs = controllers(w)
    for _ in range(6):
        w.down.add("s-1@a")
        await run_for(w, cs, CFG.detection_s * 0.8)
        w.down.discard("s-1@a")
        await run_for(w, cs, 0.5)
    assert w.actions == []


async def test_off_means_no_action_and_on_acts() -> None:
    w = ControllerWorld(mode=af.Mode(True, {"s-1": False}))
    cs = controllers(w)
    w.down.add("s-1@a")
    await run_for(w, cs, 4.0)
    assert w.actions == []
    assert w.decisions[-1].reason is af.Reason.DISABLED
    w.mode = af.Mode(False, {"s-1": True})
    await run_for(w, cs, 0.5)
    assert len(w.actions) == 1


async def test_anti_flap_window_blocks_a_second_failover() -> None:
    w = ControllerWorld()
    cs = controllers(w)
    w.down.add("s-1@a")
    await run_for(w, cs, 3.0)
    assert len(w.actions) == 1
    # The new primary gets a synchronous standby again (an operator's rejoin) and dies too.
    w.view = replace(w.view, region_survival=True, standby="s-1@a", standby_region="a")
    w.down = {"s-1@b"}
    await run_for(w, cs, 10.0)
    assert len(w.actions) == 1
    assert any(d.reason is af.Reason.ANTI_FLAP for d in w.decisions)


async def test_stale_verdicts_of_dead_controllers_are_no_majority() -> None:
    w = ControllerWorld(mode=af.Mode(enabled=False))
    cs = controllers(w)
    w.down.add("s-1@a")
    await run_for(w, cs, 3.0)
    assert w.actions == []
    # b and c die with "down for 3 s" verdicts still in etcd (their leases not yet expired).
    # Such a verdict is evidence for verdict_stale_s after its last change, not longer: once
    # that passed, a alone is no majority, whatever the old verdicts say.
    await run_for(w, [cs[0]], CFG.verdict_stale_s + 0.25)
    w.mode = af.Mode(enabled=True)
    await run_for(w, [cs[0]], 5.0)
    assert w.actions == []
    assert w.decisions[-1].reason is af.Reason.SUSPECTED


@pytest.mark.parametrize(("total", "need"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)])
def test_majority(total: int, need: int) -> None:
    assert af.majority(total) == need


async def test_an_unchanged_verdict_is_published_only_as_a_heartbeat() -> None:
    """Idle, a controller writes etcd once per heartbeat, not every round (each put is a raft
    commit with an fsync on every member); a suspicion goes out on the round that saw it."""
    w = ControllerWorld()
    cs = controllers(w)
    await run_for(w, cs, 10.0)
    per_region = len(w.published) / len(REGIONS)
    rounds = 10.0 / 0.25
    assert per_region <= 10.0 / CFG.verdict_heartbeat_s + 1 < rounds
    # Every reader still sees every region's counter move within the staleness bound.
    for r in REGIONS:
        times = [t for t, v in w.published if v.region == r]
        assert max(b - a for a, b in itertools.pairwise(times)) < CFG.verdict_stale_s
    w.published.clear()
    w.down.add("s-1@a")
    seen_at = w.now
    await run_for(w, cs, 0.25)
    assert {v.region for _, v in w.published} == set(REGIONS)
    assert all(t == seen_at and v.shards["s-1"].primary_down_s is not None for t, v in w.published)
    # While it stays down, "down for" grows: every round publishes.
    w.published.clear()
    await run_for(w, cs, 1.0)
    assert len(w.published) == len(REGIONS) * 4


# -- idle cadence: rounds at the backstop interval, woken at once by a closed connection --------

IDLE_CFG = af.Config()
# The fake clock's resolution for the adaptive schedules below.
TICK_S = 0.05


class Schedule:
    """Runs each controller when its own ``next_round_s`` says, as infra.controller does;
    ``wake`` is a sentinel seeing its connection close (the round runs now)."""

    def __init__(self, w: ControllerWorld, cs: list[af.Controller]) -> None:
        self.w, self.cs = w, cs
        self.due = [w.now] * len(cs)
        self.rounds = [0] * len(cs)

    def wake(self) -> None:
        self.due = [self.w.now] * len(self.cs)

    async def run_for(self, seconds: float, until: object = None) -> None:
        w = self.w
        end = w.now + seconds
        while w.now < end - 1e-9 and not (until is not None and until()):  # type: ignore[operator]
            ready = [i for i, t in enumerate(self.due) if t <= w.now + 1e-9]
            await asyncio.gather(*(self.cs[i].round(1000.0 + w.now, lambda: w.now) for i in ready))
            for i in ready:
                self.due[i] = w.now + self.cs[i].next_round_s()
                self.rounds[i] += 1
            w.now = round(w.now + TICK_S, 6)


def idle_controllers(w: ControllerWorld) -> list[af.Controller]:
    return [af.Controller(FakeControllerIO(w, r), regions_total=3, cfg=IDLE_CFG) for r in REGIONS]


async def test_idle_controllers_probe_at_the_backstop_interval_and_stay_fresh() -> None:
    w = ControllerWorld()
    sched = Schedule(w, idle_controllers(w))
    await sched.run_for(30.0)
    # Two servers per round: the idle rate, not the fast one (a sixth of the probes).
    per_controller = w.probes / len(REGIONS)
    assert per_controller <= 2 * (30.0 / IDLE_CFG.probe_idle_interval_s + 1)
    assert per_controller < 2 * 30.0 / IDLE_CFG.probe_interval_s / 4
    assert w.actions == []
    assert all(d.reason is af.Reason.HEALTHY for d in w.decisions)
    assert not any(c.alert for c in sched.cs)
    # Every idle round republishes: every region's counter moves well within the bound.
    for r in REGIONS:
        times = [t for t, v in w.published if v.region == r]
        assert max(b - a for a, b in itertools.pairwise(times)) < IDLE_CFG.verdict_stale_s


async def test_a_kill_seen_by_the_sentinels_fails_over_as_fast_as_before() -> None:
    w = ControllerWorld()
    sched = Schedule(w, idle_controllers(w))
    await sched.run_for(5.0)
    # Mid-way between two idle rounds: the connections close and every sentinel wakes its round.
    await sched.run_for(IDLE_CFG.probe_idle_interval_s / 2)
    w.down.add("s-1@a")
    killed = w.now
    sched.wake()
    await sched.run_for(10.0, until=lambda: bool(w.actions))
    assert len(w.actions) == 1, w.actions
    assert IDLE_CFG.detection_s <= w.now - killed <= IDLE_CFG.detection_s + 0.5


async def test_a_hang_is_found_by_the_backstop_probe_within_one_idle_interval_more() -> None:
    w = ControllerWorld()
    sched = Schedule(w, idle_controllers(w))
    await sched.run_for(5.0 + TICK_S)
    # No socket closes (SIGSTOP): nobody wakes, the next idle round's probe fails.
    w.down.add("s-1@a")
    hung = w.now
    await sched.run_for(15.0, until=lambda: bool(w.actions))
    assert len(w.actions) == 1, w.actions
    took = w.now - hung
    assert (
        IDLE_CFG.detection_s
        <= took
        <= IDLE_CFG.detection_s + IDLE_CFG.probe_idle_interval_s + 2 * IDLE_CFG.probe_interval_s
    )
    # Once anything was suspected, the rounds ran at the fast rate.
    assert any(c.alert for c in sched.cs) or w.actions


async def test_pauses_below_the_detection_time_never_trigger_at_the_idle_cadence() -> None:
    w = ControllerWorld()
    sched = Schedule(w, idle_controllers(w))
    for _ in range(6):
        w.down.add("s-1@a")
        await sched.run_for(IDLE_CFG.detection_s * 0.8)
        w.down.discard("s-1@a")
        await sched.run_for(2.0)
    assert w.actions == []


async def test_a_suspicion_elsewhere_puts_every_controller_on_the_fast_cadence() -> None:
    """Only region c loses sight of the primary (a one-sided cut): a and b see its "down" in
    c's verdict and probe fast too, so a real failure would be confirmed at once."""
    w = ControllerWorld(cut={("c", "s-1@a")})
    cs = idle_controllers(w)
    sched = Schedule(w, cs)
    await sched.run_for(6.0)
    assert all(c.alert for c in cs)
    assert all(c.next_round_s() == IDLE_CFG.probe_interval_s for c in cs)
    assert w.actions == []
    w.cut.clear()
    await sched.run_for(6.0)
    assert not any(c.alert for c in cs)
    assert all(c.next_round_s() == IDLE_CFG.probe_idle_interval_s for c in cs)
