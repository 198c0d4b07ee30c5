"""Per-client limits and cost: requests and tokens per minute (429 `rate_limit_exceeded`, with
Retry-After), a hard cap on what a client may spend per hour, day or month at the server's
prices (429 `insufficient_quota`), and the cost of every request (its log line, stoke_cost_total).

A client is an API key: each key of --api-key has budgets of its own; without keys every
request shares one (a bearer token the server does not check is no identity).

Admission reserves what a request may use at most: one request, its prompts plus n x max_tokens
tokens for each, and their price as if no prompt token came from the prefix cache. Requests in flight
together therefore never overshoot the cost cap. When the request ends its reservation is
settled to what it used (its usage's tokens; cached prompt tokens at their own price) and the
rest is given back. A request the engine never started computing (it refused the request, was
gone, or the request left the queue unscheduled: the client went, the request timed out) uses
no tokens and costs nothing; it keeps its place in the requests-per-minute budget, as a request
made. One it started is charged its whole prompt. A prompt's most is at the higher of the
prompt and cached-prompt prices.

Rates are token buckets: a limit of L per minute holds L and refills L/60 a second, so a client
may burst L and then runs at L a minute. A request larger than the whole tokens-per-minute
budget is not refused forever: it waits for a full bucket and overdraws it, and the client's
next requests wait the overdraft out, so over time the rate holds. The cost cap is hard: a
request whose most expensive outcome does not fit what is left of the period's budget is
refused, with how much is left and when the budget resets.

The state lives in this process's memory: a restart starts every budget afresh.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server import errors
from server.config import ServerConfig

COST_CAP_PERIODS = ("hour", "day", "month")


@dataclass(frozen=True, slots=True)
class Pricing:
    """Prices per million tokens, in any one currency (the cost is in it)."""

    prompt: float = 0.0  # prompt tokens the model computed
    completion: float = 0.0  # generated tokens
    cached_prompt: float | None = None  # prompt tokens from the prefix cache (None: the prompt's price)

    @property
    def priced(self) -> bool:
        return bool(self.prompt or self.completion or self.cached_prompt)

    def most(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The highest cost these tokens can come to, whatever of the prompt the cache holds."""
        prompt_price = max(self.prompt, self.prompt if self.cached_prompt is None else self.cached_prompt)
        return (prompt_tokens * prompt_price + completion_tokens * self.completion) / 1e6

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        cached_price = self.prompt if self.cached_prompt is None else self.cached_prompt
        return ((prompt_tokens - cached_tokens) * self.prompt + cached_tokens * cached_price
                + completion_tokens * self.completion) / 1e6


class TokenBucket:
    """`per_minute` units: holds that many at most, refills per_minute / 60 a second. Its level
    may fall below zero (an overdraft that later takers wait out)."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.time = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.time) * self.rate)
        self.time = now

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` (at most the whole bucket) can be taken; 0: now."""
        self._refill(now)
        return max(0.0, min(amount, self.capacity) - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self.level))

    def until_full(self, now: float) -> float:
        self._refill(now)
        return (self.capacity - self.level) / self.rate


@dataclass(slots=True)
class ClientBudget:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    period_start: float = 0.0  # the cost cap's current period (epoch seconds, UTC)
    spent: float = 0.0  # settled cost in the period
    reserved: float = 0.0  # the most the requests in flight may still cost
    in_flight: int = 0  # their number (at 0, `reserved` is exactly 0: no float residue)


@dataclass(slots=True)
class Reservation:
    """What admission set aside for one request, until `Limits.settle`."""

    budget: ClientBudget
    tokens: float  # taken from the tokens-per-minute bucket
    cost: float  # reserved against the cost cap
    settled: bool = False


@dataclass(slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    pricing: Pricing = field(default_factory=Pricing)
    cost_cap: float | None = None
    cost_cap_period: str = "day"
    clock: Callable[[], float] = time.monotonic  # the rate buckets'
    wall_clock: Callable[[], float] = time.time  # the cost cap's periods (UTC)
    _budgets: dict[str, ClientBudget] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        prices = (self.pricing.prompt, self.pricing.completion, self.pricing.cached_prompt or 0.0)
        if any(not (math.isfinite(p) and p >= 0) for p in prices):
            raise ValueError(f"prices must be finite and >= 0, got {prices}")
        if self.cost_cap is not None:
            if not (math.isfinite(self.cost_cap) and self.cost_cap >= 0):
                raise ValueError(f"the cost cap must be finite and >= 0, got {self.cost_cap}")
            if not self.pricing.priced:
                raise ValueError("a cost cap needs prices (--price-prompt, --price-completion)")
        if self.cost_cap_period not in COST_CAP_PERIODS:
            raise ValueError(f"the cost cap's period must be one of {COST_CAP_PERIODS}, got {self.cost_cap_period!r}")

    @property
    def rate_limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def _budget(self, client: str) -> ClientBudget:
        budget = self._budgets.get(client)
        if budget is None:
            now = self.clock()
            budget = self._budgets[client] = ClientBudget(
                TokenBucket(self.requests_per_minute, now) if self.requests_per_minute else None,
                TokenBucket(self.tokens_per_minute, now) if self.tokens_per_minute else None)
        return self._in_current_period(budget)

    def _in_current_period(self, budget: ClientBudget) -> ClientBudget:
        """The budget, moved to the cost cap's current period (a new one spends afresh)."""
        if self.cost_cap is not None:
            start = self._period_start(self.wall_clock())
            if start != budget.period_start:
                budget.period_start, budget.spent = start, 0.0
        return budget

    def admit(self, client: str, prompt_tokens: int, max_completion_tokens: int) -> Reservation:
        """Reserve a request's most, or raise the 429 that says which limit it meets and when
        to retry. Nothing is taken from any budget unless every one admits it."""
        budget = self._budget(client)
        now = self.clock()
        tokens = prompt_tokens + max_completion_tokens
        cost = self.pricing.most(prompt_tokens, max_completion_tokens)
        waits = []
        if budget.requests is not None:
            waits.append((budget.requests.wait(1, now), "requests", self.requests_per_minute, 1))
        if budget.tokens is not None:
            waits.append((budget.tokens.wait(tokens, now), "tokens", self.tokens_per_minute, tokens))
        if waits and max(waits)[0] > 0:  # the longest wait: a retry after it passes both
            wait, kind, limit, asked = max(waits)
            raise errors.rate_limited(
                f"rate limit reached on {kind} per minute: limit {limit}, this request needs {asked}; "
                f"retry in {_duration(wait)}", kind=kind, retry_after=wait, headers=self.headers(budget))
        if self.cost_cap is not None and budget.spent + budget.reserved + cost > self.cost_cap:
            left = max(0.0, self.cost_cap - budget.spent - budget.reserved)
            resets = self._period_end(budget.period_start)
            held = f", with {budget.reserved:.6g} more held by requests in flight" if budget.reserved else ""
            generates = max_completion_tokens > 0  # an embedding's cost is its prompt's alone
            raise errors.quota_exceeded(
                f"cost cap reached: this request may cost up to {cost:.6g} (its prompt"
                f"{' and max_tokens' if generates else ''} at the server's prices), and {left:.6g} of this "
                f"{self.cost_cap_period}'s {self.cost_cap:g} is left{held}; the budget resets at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(resets))}. "
                f"{'Lower max_tokens, or wait.' if generates else 'Wait, or send less input.'}")
        if budget.requests is not None:
            budget.requests.take(1, now)
        taken = 0.0
        if budget.tokens is not None:
            taken = min(tokens, budget.tokens.capacity)  # more overdraws at settlement
            budget.tokens.take(taken, now)
        budget.reserved += cost
        budget.in_flight += 1
        return Reservation(budget, taken, cost)

    def settle(self, reservation: Reservation | None, prompt_tokens: int, cached_tokens: int,
               completion_tokens: int, ran: bool) -> float:
        """A request's end: its cost (0 if the engine never started it), charged to the period's
        budget in place of its reservation, and its tokens in place of those reserved."""
        cost = self.pricing.cost(prompt_tokens, cached_tokens, completion_tokens) if ran else 0.0
        if reservation is None or reservation.settled:
            return cost
        reservation.settled = True
        budget = self._in_current_period(reservation.budget)
        budget.in_flight -= 1
        budget.reserved = budget.reserved - reservation.cost if budget.in_flight else 0.0
        budget.spent += cost
        if budget.tokens is not None:
            used = prompt_tokens + completion_tokens if ran else 0
            budget.tokens.give(reservation.tokens - used, self.clock())
        return cost

    def headers(self, budget: ClientBudget) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for a client's rate budgets."""
        now = self.clock()
        out: dict[str, str] = {}
        for kind, bucket, limit in (("requests", budget.requests, self.requests_per_minute),
                                    ("tokens", budget.tokens, self.tokens_per_minute)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining(now))
                out[f"x-ratelimit-reset-{kind}"] = _duration(bucket.until_full(now))
        return out

    def _period_start(self, now: float) -> float:
        t = time.gmtime(now)
        if self.cost_cap_period == "hour":
            return float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, 0, 0)))
        if self.cost_cap_period == "day":
            return float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)))
        return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))

    def _period_end(self, start: float) -> float:
        if self.cost_cap_period == "hour":
            return start + 3600.0
        if self.cost_cap_period == "day":
            return start + 86400.0
        t = time.gmtime(start)
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def limits_from_config(config: ServerConfig) -> Limits:
    """The server's limits (ValueError for a bad option)."""
    return Limits(config.rate_limit_requests, config.rate_limit_tokens,
                  Pricing(config.price_prompt, config.price_completion, config.price_cached_prompt),
                  config.cost_cap, config.cost_cap_period)


def _duration(seconds: float) -> str:
    """As OpenAI's reset headers write it: '250ms', '1.5s', '6m0s'."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    tenths = math.ceil(seconds * 10) / 10
    if tenths < 60:
        return f"{tenths:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"
