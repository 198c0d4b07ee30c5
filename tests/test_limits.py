"""Per-client limits without a server (server/limits.py): rate buckets, the cost cap and its
periods, reservations settled to the usage, prices."""

from __future__ import annotations

import calendar

import pytest

from server.errors import APIError
from server.limits import Limits, Pricing, _duration


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def limits(clock: Clock, wall: Clock | None = None, **kwargs) -> Limits:
    return Limits(clock=clock, wall_clock=wall or Clock(calendar.timegm((2026, 12, 6, 10, 0, 0))), **kwargs)


def refused(lim: Limits, client: str, prompt: int, completion: int) -> APIError:
    with pytest.raises(APIError) as info:
        lim.admit(client, prompt, completion)
    assert info.value.status == 429 and info.value.metric == "rate_limited"
    return info.value


def test_prices_per_million_tokens_with_cached_prompt_tokens_at_their_own():
    assert Pricing(prompt=2.0, completion=10.0).cost(1000, 400, 100) == pytest.approx((1000 * 2 + 100 * 10) / 1e6)
    priced = Pricing(prompt=2.0, completion=10.0, cached_prompt=0.5)
    assert priced.cost(1000, 400, 100) == pytest.approx((600 * 2 + 400 * 0.5 + 100 * 10) / 1e6)
    assert not Pricing().priced and Pricing(completion=1.0).priced


def test_requests_per_minute_refill_and_say_when_to_retry():
    clock = Clock()
    lim = limits(clock, requests_per_minute=2)
    lim.admit("a", 5, 5)
    lim.admit("a", 5, 5)
    error = refused(lim, "a", 5, 5)
    assert (error.code, error.type) == ("rate_limit_exceeded", "requests")
    assert error.headers["retry-after"] == "30" and error.headers["retry-after-ms"] == "30000"
    assert error.headers["x-ratelimit-limit-requests"] == "2" and error.headers["x-ratelimit-remaining-requests"] == "0"
    assert "limit 2" in error.message and "retry in 30s" in error.message
    lim.admit("b", 5, 5)  # another client's budget is its own
    clock.t += 29.9
    refused(lim, "a", 5, 5)
    clock.t += 0.1
    lim.admit("a", 5, 5)


def test_tokens_are_reserved_then_settled_to_the_usage():
    clock = Clock()
    lim = limits(clock, tokens_per_minute=100)
    first = lim.admit("a", 10, 50)  # 60 held
    error = refused(lim, "a", 10, 50)  # 40 left, 60 asked: 20 more at 100/60 a second
    assert error.type == "tokens" and error.headers["retry-after"] == "12"
    lim.settle(first, prompt_tokens=10, cached_tokens=0, completion_tokens=5, ran=True)  # used 15: 45 back
    assert lim.headers(first.budget)["x-ratelimit-remaining-tokens"] == "85"
    second = lim.admit("a", 10, 50)
    lim.settle(second, 10, 0, 0, ran=False)  # the engine never ran it: all 60 back
    assert lim.headers(second.budget)["x-ratelimit-remaining-tokens"] == "85"


def test_retry_after_is_the_longest_wait_of_the_limits_a_request_meets():
    clock = Clock()
    lim = limits(clock, requests_per_minute=2, tokens_per_minute=100)
    lim.settle(lim.admit("a", 0, 100), 0, 0, 100, ran=True)
    lim.admit("a", 0, 0)
    error = refused(lim, "a", 0, 100)  # a request in 30 s, the tokens in 60 s
    assert error.type == "tokens" and error.headers["retry-after"] == "60"
    clock.t += 60
    lim.admit("a", 0, 100)


def test_a_request_over_the_whole_token_budget_waits_for_a_full_one_and_overdraws_it():
    clock = Clock()
    lim = limits(clock, tokens_per_minute=100)
    small = lim.admit("a", 10, 0)
    refused(lim, "a", 100, 100)  # not refused for good: once the bucket is full again
    lim.settle(small, 10, 0, 0, ran=True)
    clock.t += 6  # refilled
    big = lim.admit("a", 100, 100)
    lim.settle(big, 100, 0, 50, ran=True)  # 150 used: 50 overdrawn
    error = refused(lim, "a", 10, 0)  # 60 to wait out: 36 s
    assert error.headers["retry-after"] == "36"
    clock.t += 36
    lim.admit("a", 10, 0)


def test_the_cost_cap_counts_requests_in_flight_at_their_most():
    clock = Clock()
    lim = limits(clock, pricing=Pricing(prompt=1000.0, completion=100_000.0), cost_cap=1.0)  # 0.001, 0.1 a token
    first = lim.admit("a", 3, 4)  # at most 0.403
    second = lim.admit("a", 3, 4)  # 0.806 held
    error = refused(lim, "a", 3, 4)  # 1.209 > 1
    assert (error.code, error.type, error.headers) == ("insufficient_quota", "insufficient_quota",
                                                       {"x-should-retry": "false"})
    assert "0.194 of this day's 1 is left, with 0.806 more held" in error.message
    assert "2026-12-07T00:00:00Z" in error.message
    lim.admit("b", 3, 4)  # another client's budget
    assert lim.settle(first, 3, 0, 1, ran=True) == pytest.approx(0.103)  # stopped early: 0.3 back
    third = lim.admit("a", 3, 4)  # 0.103 + 0.403 + 0.403 = 0.909
    assert lim.settle(second, 3, 0, 4, ran=True) == pytest.approx(0.403)
    assert lim.settle(third, 3, 0, 4, ran=False) == 0.0  # never ran: costs nothing
    assert third.budget.spent == pytest.approx(0.506) and third.budget.reserved == pytest.approx(0.0)
    refused(lim, "a", 3, 5)  # 0.503 more would pass 1
    lim.admit("a", 3, 4)
    # an embedding generates nothing: its cost is its prompt's, and max_tokens is not the way out
    error = refused(lim, "b", 700, 0)
    assert "(its prompt at the server's prices)" in error.message and "max_tokens" not in error.message


def test_the_cost_cap_holds_a_prompt_at_its_dearer_price_and_leaves_no_residue():
    clock = Clock()
    lim = limits(clock, pricing=Pricing(prompt=1e6, cached_prompt=2e6, completion=0.1e6), cost_cap=5.0)
    held = lim.admit("a", 2, 0)  # at most 4: a cached prompt token costs 2
    assert lim.settle(held, 2, 2, 0, ran=True) == 4.0
    refused(lim, "a", 1, 0)  # 2 more might pass 5
    for _ in range(3):  # costs that leave float residue in a running sum
        lim.settle(lim.admit("a", 0, 3), 0, 0, 1, ran=True)
    assert held.budget.reserved == 0.0 and held.budget.in_flight == 0


def test_the_cost_cap_resets_with_its_period():
    clock, wall = Clock(), Clock(calendar.timegm((2026, 12, 31, 23, 59, 0)))
    lim = limits(clock, wall, pricing=Pricing(completion=1e6), cost_cap=3.0, cost_cap_period="month")  # 1 a token
    held = lim.admit("a", 0, 2)
    error = refused(lim, "a", 0, 2)
    assert "2027-01-01T00:00:00Z" in error.message and "this month's 3" in error.message
    wall.t += 120  # a new month: nothing spent yet, the request in flight still held
    refused(lim, "a", 0, 2)
    lim.settle(held, 0, 0, 2, ran=True)  # charged to the new month
    lim.admit("a", 0, 1)
    refused(lim, "a", 0, 1)


def test_a_reservation_is_settled_once():
    clock = Clock()
    lim = limits(clock, tokens_per_minute=100, pricing=Pricing(completion=1e6), cost_cap=10.0)
    held = lim.admit("a", 0, 5)
    assert lim.settle(held, 0, 0, 5, ran=True) == 5.0
    assert lim.settle(held, 0, 0, 5, ran=True) == 5.0  # the cost again, but charged once
    assert held.budget.spent == 5.0 and lim.headers(held.budget)["x-ratelimit-remaining-tokens"] == "95"


@pytest.mark.parametrize("kwargs, message", [
    (dict(requests_per_minute=0), "requests_per_minute"),
    (dict(tokens_per_minute=-5), "tokens_per_minute"),
    (dict(cost_cap=5.0), "needs prices"),
    (dict(cost_cap=float("nan"), pricing=Pricing(prompt=1.0)), "cost cap"),
    (dict(pricing=Pricing(prompt=-1.0)), "prices"),
    (dict(cost_cap=1.0, pricing=Pricing(prompt=1.0), cost_cap_period="week"), "period"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)


def test_durations_as_openai_writes_them():
    assert [_duration(s) for s in (0.25, 1.5, 12.0, 59.99, 360.0, 90.5)] == ["250ms", "1.5s", "12s", "1m0s", "6m0s",
                                                                              "1m31s"]
