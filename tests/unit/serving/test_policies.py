"""The batcher's policies alone, driven with made-up times and costs."""

from __future__ import annotations

import pytest

from cnnctl.serving import policies
from cnnctl.serving.policies import Gathering, InlinePolicy


def test_inline_only_for_sizes_measured_cheap() -> None:
    p = InlinePolicy(below_s=200e-6, full_below_s=2e-3, full_images=64)
    assert not p.cheap(1)  # never seen: the pool measures it first
    p.ran(1, 50e-6)
    p.ran(8, 500e-6)
    assert p.cheap(1)
    assert not p.cheap(8)  # over the threshold for a batch others could join
    assert p.cheap(8, full=True)  # a full one (e.g. gathered) has the higher threshold
    p.ran(64, 1.5e-3)
    p.ran(100, 1.5e-3)
    assert p.cheap(64) and p.cheap(100)  # full_images or more: full by size


def test_inline_cost_is_a_moving_average() -> None:
    p = InlinePolicy(below_s=200e-6, full_below_s=0.0, full_images=64)
    p.ran(4, 100e-6)
    p.ran(4, 1e-3)  # one slow run: 0.9 * 100 + 0.1 * 1000 = 190 µs, still cheap
    assert p.cheap(4)
    p.ran(4, 1e-3)  # 271 µs
    assert not p.cheap(4)


def test_inline_thresholds_of_zero_mean_always_the_pool() -> None:
    p = InlinePolicy(below_s=0.0, full_below_s=0.0, full_images=64)
    p.ran(1, 0.0)
    p.ran(64, 0.0)
    assert not p.cheap(1) and not p.cheap(64) and not p.cheap(1, full=True)


def gathered(g: Gathering, now: float, images: int) -> None:
    """A gathering that started at ``now`` and sent ``images`` 5 ms later."""
    assert g.begin(1, now)
    g.arrived(now, None)
    g.end(images, now + 0.005)


def test_gathering_probes_with_a_doubling_wait_while_it_finds_no_company() -> None:
    g = Gathering(max_s=0.01, max_images=64)
    probes = []
    for ms in range(2000):
        if g.begin(1, ms / 1000):
            probes.append(ms / 1000)
            g.end(1, ms / 1000)  # it gathered only itself
    # the wait to the next probe doubles: 0.1, 0.2, 0.4, then 0.8 s at most
    assert probes == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5], abs=0.005)


def test_gathering_turns_on_after_a_probe_with_company_and_off_when_batches_shrink() -> None:
    g = Gathering(max_s=0.01, max_images=64)
    gathered(g, 0.0, policies.ON_IMAGES - 1)  # a probe short of ON_IMAGES: still off
    assert not g.begin(1, 0.05)
    gathered(g, 0.2, policies.ON_IMAGES)  # the next probe turns it on
    assert g.begin(1, 0.21)  # every cheap request that finds the model idle gathers now
    g.arrived(0.21, None)
    g.end(policies.ON_IMAGES, 0.215)
    t = 0.3
    while g.begin(1, t):  # batches of half the size pull the moving average down
        g.arrived(t, None)
        g.end(policies.ON_IMAGES // 2, t + 0.005)
        t += 0.01
    assert 0.3 < t < 0.3 + 0.01 * 10
    assert not g.begin(1, t + policies.PROBE_S / 2)  # off: the next probe comes PROBE_S later
    assert g.begin(1, t + policies.PROBE_S)


def test_gathering_goes_after_a_quiet_period_or_max_s_or_half_a_deadline() -> None:
    g = Gathering(max_s=0.01, max_images=64)
    assert g.begin(1, 1.0)
    g.arrived(1.0, None)
    assert g.due() == pytest.approx(1.0 + policies.QUIET_S)
    g.arrived(1.0005, None)  # each arrival pushes the quiet period on ...
    assert g.due() == pytest.approx(1.0005 + policies.QUIET_S)
    for t in (1.002, 1.004, 1.006, 1.008, 1.0095):
        g.arrived(t, None)
    assert g.due() == pytest.approx(1.01)  # ... up to max_s after the first
    g.arrived(1.0096, 1.0098)  # a request with 0.2 ms left: half of it
    assert g.due() == pytest.approx(1.0097)


def test_gathering_never_for_a_full_request_or_when_off() -> None:
    assert not Gathering(max_s=0.01, max_images=64).begin(64, 0.0)
    assert not Gathering(max_s=0.0, max_images=64).begin(1, 0.0)
    assert Gathering(max_s=0.01, max_images=64).begin(63, 0.0)
    # a batch cap under ON_IMAGES: no probe could ever turn gathering on, so none waits
    assert not Gathering(max_s=0.01, max_images=policies.ON_IMAGES - 1).begin(1, 0.0)
    assert Gathering(max_s=0.01, max_images=policies.ON_IMAGES).begin(1, 0.0)


def test_gather_max_ms_help_states_the_threshold_in_use() -> None:
    from cnnctl.serving.commands import serve

    option = next(p for p in serve.params if p.name == "gather_max_ms")
    assert f"batches of {policies.ON_IMAGES}+ images" in (option.help or "")
