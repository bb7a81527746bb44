"""Per-subscription event accounting in Redis: counters, de-duplication, gaps and silences.

Every topic-based notification says how many events its Subscription has produced
(``events-since-subscription-start``) and numbers the events it carries. Per subscription we keep:

* ``watermark``: every event up to this number has been seen (or recovered);
* ``max_event``: the highest event number the EHR has told us about;
* a sorted set of event numbers seen above the watermark (out-of-order arrivals);
* one key per (subscription, event number) holding the event's focus, for de-duplication;
* when the notifications of each kind last arrived, how many, the last error, and the heartbeat period.

A gap (``watermark < max_event``) that outlives the grace period, or a subscription that stays silent
for longer than its heartbeat period, is handed to a worker to recover through the EHR's ``$events``
(see :mod:`worker.recovery`). All of it lives in Redis, so a restart forgets nothing.

Redis Lua scripts keep each step atomic; they touch keys they compute themselves, so they need a
single Redis (not Redis Cluster).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from core.jobs import Envelope
from core.origin import parse_reference
from core.redis_client import queue_script

EVENT_TTL_SECONDS = 14 * 24 * 3600
MAX_REFERENCE_LENGTH = 256

_ACCEPT = """
local h, pend, times, reg = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, ntype, since_s = ARGV[1], ARGV[2], ARGV[3]
local status, topic, shape, ref = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local ttl, eprefix, n = tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
redis.call('SADD', reg, ref)
redis.call('HSET', h, 'reference', ref, 'last_seen', now, 'last_' .. ntype, now)
redis.call('HINCRBY', h, 'count_' .. ntype, 1)
if status ~= '' then redis.call('HSET', h, 'status', status) end
if topic ~= '' then redis.call('HSET', h, 'topic', topic) end
if shape ~= '' then redis.call('HSET', h, 'shape', shape) end
local since = tonumber(since_s)
local wm = tonumber(redis.call('HGET', h, 'watermark') or '')
-- A handshake with a lower count than ours: the EHR restarted the subscription's numbering.
if ntype == 'handshake' and since ~= nil and (wm == nil or since < wm) then
  if wm ~= nil then redis.call('HINCRBY', h, 'generation', 1) end
  redis.call('DEL', pend, times)
  redis.call('HSET', h, 'watermark', since, 'max_event', since)
  redis.call('HDEL', h, 'gap_since', 'gap_reported')
  wm = since
end
local gen = redis.call('HGET', h, 'generation') or '0'
local claims, nums = {}, {}
for i = 0, n - 1 do
  local base = 11 + 5 * i
  local num_s, focus, etime, qkey, payload = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  local num = tonumber(num_s)
  nums[#nums + 1] = {num, etime}
  local key = eprefix .. gen .. ':' .. num_s
  local claim = 'new'
  if not redis.call('SET', key, focus, 'NX', 'EX', ttl) then
    if redis.call('GET', key) == focus then
      claim = 'dup'
    else
      redis.call('SET', key, focus, 'EX', ttl)
      claim = 'reused'
    end
  end
  -- The event's job (if any) is queued with its claim, or not at all.
  if claim ~= 'dup' and payload ~= '' then redis.call('LPUSH', qkey, payload) end
  claims[#claims + 1] = claim
end
if wm == nil then
  local init = nil
  for _, item in ipairs(nums) do
    if init == nil or item[1] - 1 < init then init = item[1] - 1 end
  end
  if init == nil and since ~= nil then init = since end
  if init ~= nil then
    wm = init
    redis.call('HSET', h, 'watermark', wm, 'max_event', wm)
  end
end
local prev_time = redis.call('HGET', h, 'watermark_time') or ''
local mx = -1
if wm ~= nil then
  mx = tonumber(redis.call('HGET', h, 'max_event') or wm)
  for _, item in ipairs(nums) do
    if item[1] > wm then
      redis.call('ZADD', pend, item[1], item[1])
      if item[2] ~= '' then redis.call('HSET', times, item[1], item[2]) end
    end
    if item[1] > mx then mx = item[1] end
  end
  if since ~= nil and since > mx then mx = since end
  while redis.call('ZSCORE', pend, wm + 1) do
    wm = wm + 1
    redis.call('ZREM', pend, wm)
    local t = redis.call('HGET', times, wm)
    if t then redis.call('HSET', h, 'watermark_time', t); redis.call('HDEL', times, wm) end
  end
  redis.call('HSET', h, 'watermark', wm, 'max_event', mx)
  if wm < mx then
    if not redis.call('HGET', h, 'gap_since') then redis.call('HSET', h, 'gap_since', now) end
  else
    redis.call('HDEL', h, 'gap_since', 'gap_reported')
  end
else
  wm = -1
end
local result = {tostring(wm), tostring(mx), prev_time}
for _, c in ipairs(claims) do result[#result + 1] = c end
return result
"""

_RELEASE = """
local gen = redis.call('HGET', KEYS[1], 'generation') or '0'
for i = 2, #ARGV do redis.call('DEL', ARGV[1] .. gen .. ':' .. ARGV[i]) end
return 1
"""

# Recovery covered every event up to ARGV[1]: move the watermark there (never backwards); return it.
_RECOVERED = """
local h, pend, times = KEYS[1], KEYS[2], KEYS[3]
local upto, stamp = tonumber(ARGV[1]), ARGV[2]
local wm = tonumber(redis.call('HGET', h, 'watermark') or '')
if wm == nil then
  wm = upto
  redis.call('HSET', h, 'watermark', wm, 'max_event', wm)
end
if upto > wm then
  local mx = tonumber(redis.call('HGET', h, 'max_event') or wm)
  wm = upto
  if mx < wm then mx = wm end
  redis.call('ZREMRANGEBYSCORE', pend, '-inf', wm)
  while redis.call('ZSCORE', pend, wm + 1) do
    wm = wm + 1
    redis.call('ZREM', pend, wm)
  end
  for _, f in ipairs(redis.call('HKEYS', times)) do
    if tonumber(f) <= wm then redis.call('HDEL', times, f) end
  end
  redis.call('HSET', h, 'watermark', wm, 'max_event', mx)
end
if stamp ~= '' then redis.call('HSET', h, 'watermark_time', stamp) end
local mx = tonumber(redis.call('HGET', h, 'max_event') or wm)
if wm >= mx then redis.call('HDEL', h, 'gap_since', 'gap_reported') end
return wm
"""


def subscription_key(reference: str | None) -> str | None:
    """``Subscription/{id}`` for any form of the reference the EHR sends (relative, absolute, versioned)."""
    if not reference:
        return None
    parsed = parse_reference(reference)
    if parsed is not None and parsed.resource_type == "Subscription":
        return parsed.relative
    return reference[:MAX_REFERENCE_LENGTH]


@dataclass(frozen=True)
class EventInput:
    number: int
    focus: str
    timestamp: float | None
    envelope: Envelope | None = None  # the event's task message, pushed only if the event is new


@dataclass(frozen=True)
class Accounting:
    watermark: int | None
    max_event: int | None
    previous_watermark_time: float | None
    claims: list[str]  # per event: 'new' | 'dup' | 'reused'


@dataclass(frozen=True)
class RecoveryPlan:
    subscription: str
    from_event: int | None
    to_event: int | None
    since: float | None
    reason: str  # 'gap' | 'silence'


class SubscriptionState:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._accept = client.register_script(_ACCEPT)
        self._release = client.register_script(_RELEASE)
        self._recovered = client.register_script(_RECOVERED)

    # ------------------------------------------------------------------ keys
    def _key(self, subscription: str, *parts: str) -> str:
        return ":".join((self.prefix, "sub", subscription, *parts))

    @property
    def registry_key(self) -> str:
        return f"{self.prefix}:subscriptions"

    @property
    def totals_key(self) -> str:
        return f"{self.prefix}:receiver-totals"

    def _event_prefix(self, subscription: str) -> str:
        return f"{self.prefix}:event:{subscription}:"

    # ------------------------------------------------------------------ notifications
    def queue_accept(
        self,
        pipe: Any,
        subscription: str,
        notification_type: str,
        events: list[EventInput],
        *,
        events_since_start: int | None,
        status: str | None,
        topic: str | None,
        shape: str,
        errors: list[str],
        now: float | None = None,
    ) -> int:
        """Add to ``pipe``: record one notification and claim its events (atomically). Returns the index of
        the call whose result :meth:`accept_result` reads."""
        now = time.time() if now is None else now
        args: list[Any] = [
            repr(now),
            notification_type,
            "" if events_since_start is None else str(events_since_start),
            status or "",
            (topic or "")[:MAX_REFERENCE_LENGTH],
            shape,
            subscription,
            EVENT_TTL_SECONDS,
            self._event_prefix(subscription),
            len(events),
        ]
        for event in events:
            args += [
                str(event.number),
                event.focus,
                "" if event.timestamp is None else repr(event.timestamp),
                event.envelope.key if event.envelope else "",
                event.envelope.payload if event.envelope else "",
            ]
        keys = [self._key(subscription), self._key(subscription, "pending"), self._key(subscription, "times")]
        index = len(pipe)
        queue_script(pipe, self._accept, [*keys, self.registry_key], args)
        if errors:
            pipe.hset(
                self._key(subscription),
                mapping={"last_error": json.dumps(errors[:5])[:1000], "last_error_at": repr(now)},
            )
            pipe.hincrby(self._key(subscription), "error_count", 1)
            pipe.hincrby(self.totals_key, "error_notifications", 1)
        return index

    @staticmethod
    def accept_result(raw: Any) -> Accounting:
        values = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
        watermark, max_event = int(values[0]), int(values[1])
        return Accounting(
            watermark=None if watermark < 0 else watermark,
            max_event=None if max_event < 0 else max_event,
            previous_watermark_time=float(values[2]) if values[2] else None,
            claims=values[3:],
        )

    def accept(
        self,
        subscription: str,
        notification_type: str,
        events: list[EventInput],
        *,
        events_since_start: int | None = None,
        status: str | None = None,
        topic: str | None = None,
        shape: str = "r4-backport",
        errors: list[str] | None = None,
        now: float | None = None,
    ) -> Accounting:
        """:meth:`queue_accept` in a round trip of its own."""
        pipe = self.client.pipeline(transaction=False)
        index = self.queue_accept(
            pipe,
            subscription,
            notification_type,
            events,
            events_since_start=events_since_start,
            status=status,
            topic=topic,
            shape=shape,
            errors=errors or [],
            now=now,
        )
        return self.accept_result(pipe.execute()[index])

    def release_events(self, subscription: str, numbers: list[int]) -> None:
        """Forget event claims whose work could not be enqueued, so that the EHR's retry is processed."""
        if numbers:
            self._release(keys=[self._key(subscription)], args=[self._event_prefix(subscription), *numbers])

    def set_heartbeat(self, subscription: str, seconds: int) -> None:
        self.client.hset(self._key(subscription), mapping={"heartbeat_period": seconds, "reference": subscription})
        self.client.sadd(self.registry_key, subscription)

    def record_refused(self, subscription: str | None, count: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        if subscription:
            pipe.hincrby(self._key(subscription), "refused_count", count)
        pipe.hincrby(self.totals_key, "refused_urls", count)
        pipe.execute()

    # ------------------------------------------------------------------ reading
    def get(self, subscription: str) -> dict[str, Any]:
        raw = self.client.hgetall(self._key(subscription))
        record: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            text = value.decode() if isinstance(value, bytes) else str(value)
            if name == "last_error":
                record[name] = json.loads(text)
            elif name in ("reference", "status", "topic", "shape"):
                record[name] = text
            else:
                try:
                    number = float(text)
                except ValueError:
                    record[name] = text
                    continue
                record[name] = int(number) if number.is_integer() and "." not in text else number
        if record:
            record["pending_events"] = [
                int(float(str(m.decode() if isinstance(m, bytes) else m)))
                for m in self.client.zrange(self._key(subscription, "pending"), 0, 49)
            ]
        return record

    def all(self) -> dict[str, dict[str, Any]]:
        names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in self.client.smembers(self.registry_key))
        return {name: self.get(name) for name in names}

    def totals(self) -> dict[str, int]:
        raw = self.client.hgetall(self.totals_key)
        return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}

    # ------------------------------------------------------------------ gaps and silences
    def overdue(
        self, *, grace_seconds: float, default_heartbeat: int, retry_seconds: float, now: float | None = None
    ) -> list[RecoveryPlan]:
        """Subscriptions with a gap older than the grace period or silent beyond their heartbeat period.

        Each plan returned holds a recovery lock (one recovery per subscription at a time, retried after
        ``retry_seconds``), so several API processes never start the same recovery twice.
        """
        now = time.time() if now is None else now
        plans: list[RecoveryPlan] = []
        for name, record in self.all().items():
            watermark, max_event = record.get("watermark"), record.get("max_event")
            since = record.get("watermark_time")
            gap_since = record.get("gap_since")
            plan: RecoveryPlan | None = None
            if (
                isinstance(watermark, int)
                and isinstance(max_event, int)
                and watermark < max_event
                and gap_since is not None
                and now - float(gap_since) >= grace_seconds
            ):
                plan = RecoveryPlan(name, watermark + 1, self._last_missing(name, max_event), since, "gap")
            else:
                period = int(record.get("heartbeat_period") or default_heartbeat or 0)
                last = max(float(record.get("last_seen") or 0), float(record.get("last_silence_check") or 0))
                if period > 0 and last and now - last > period + grace_seconds:
                    start = watermark + 1 if isinstance(watermark, int) else None
                    plan = RecoveryPlan(name, start, None, since, "silence")
            if plan is None:
                continue
            lock = self._key(name, "recovering")
            if not self.client.set(lock, json.dumps(plan.__dict__), nx=True, px=max(1, int(retry_seconds * 1000))):
                continue
            pipe = self.client.pipeline(transaction=False)
            if plan.reason == "gap":
                if record.get("gap_reported") != gap_since:
                    pipe.hset(self._key(name), "gap_reported", repr(float(gap_since or 0)))
                    pipe.hincrby(self._key(name), "gaps_detected", 1)
                    pipe.hincrby(self.totals_key, "gaps_detected", 1)
            else:
                pipe.hset(self._key(name), "last_silence_check", repr(now))
                pipe.hincrby(self._key(name), "silences_detected", 1)
                pipe.hincrby(self.totals_key, "silences_detected", 1)
            pipe.execute()
            plans.append(plan)
        return plans

    def _last_missing(self, subscription: str, max_event: int) -> int:
        """The highest event number not seen: events seen out of order at the top need no recovery."""
        seen = {
            int(float(str(m.decode() if isinstance(m, bytes) else m)))
            for m in self.client.zrevrange(self._key(subscription, "pending"), 0, 10_000)
        }
        last = max_event
        while last in seen:
            last -= 1
        return last

    def mark_recovered(
        self, subscription: str, up_to: int | None, events_recovered: int, covered_until: float | None = None
    ) -> bool:
        """Recovery done: every event up to ``up_to`` is accounted for. True when that closed the gap.

        ``covered_until``: the time up to which a ``_lastUpdated`` search covered the EHR, if one ran.
        """
        closed = False
        if up_to is not None:
            keys = [self._key(subscription), self._key(subscription, "pending"), self._key(subscription, "times")]
            stamp = "" if covered_until is None else repr(covered_until)
            closed = int(self._recovered(keys=keys, args=[up_to, stamp])) >= up_to
        elif covered_until is not None:
            self.client.hset(self._key(subscription), "watermark_time", repr(covered_until))
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self._key(subscription, "recovering"))
        pipe.hincrby(self._key(subscription), "recoveries", 1)
        pipe.hincrby(self._key(subscription), "events_recovered", events_recovered)
        pipe.hincrby(self.totals_key, "recoveries", 1)
        pipe.hincrby(self.totals_key, "events_recovered", events_recovered)
        if closed:
            pipe.hincrby(self.totals_key, "gaps_recovered", 1)
            pipe.hincrby(self._key(subscription), "gaps_recovered", 1)
        pipe.execute()
        return closed

    def watermark_time(self, subscription: str) -> float | None:
        value = self.client.hget(self._key(subscription), "watermark_time")
        return float(value) if value else None
