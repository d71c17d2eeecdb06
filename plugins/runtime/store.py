"""RedisStore: the only part of the runtime that talks to Redis — keys, WATCH/MULTI, leases, streams.

Keys (namespace ``il2``)::

    {ns}:job:{id}               JSON record (records.Job)
    {ns}:job:{id}:events        stream, ids 0-<sequence>      {ns}:job:{id}:seq   its counter
    {ns}:jobs                   sorted set of job ids by create time
    {ns}:idem:{key}             idempotency key -> job id
    {ns}:lease:{id}:{i}         lease of a running stage: token, PX = lease TTL
    {ns}:fence:{id}:{i}         the running stage's attempt, with the lease's TTL (fencing token and
                                watchdog of Kubernetes pods)
    {ns}:running                members {id}:{i} of stages holding (or having held) a lease
    {ns}:cancel:{id}            cancel requested (the reason)
    {ns}:dispatch               dispatch intents {id}:{i} scored by when they were recorded
    {ns}:stage-events:{id}:{i}:{attempt}   events pushed by Kubernetes pods

:meth:`RedisStore.transact` reads a job under WATCH (and the leases named), lets a pure function
of the state machine decide, and commits the record, its events and the :class:`~.machine.Effects`
in one MULTI (retrying on a concurrent change): a reader never sees a state without its event.
Redis errors (``redis.ConnectionError`` / ``TimeoutError``) propagate: callers decide to retry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import redis

from .machine import Effects
from .records import Job, JobEvent

# Errors that mean "Redis is unreachable right now" (retry later), not "the request is wrong".
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError)

# INCR the job's sequence and XADD the event under id 0-<seq>: ids are the proto's 1, 2, 3...
_APPEND_EVENT = """
local n = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[1])
return n
"""
# The fence key lives and is renewed with the lease: pods watch its TTL (see ``launch``).
_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Compare-and-set of one dispatch intent: only the caller that saw its current time changes it
# (ARGV[3] == "": drop it). Two recovery threads that see the same stale intent send it once.
_SWAP_INTENT = """
local t = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not t or tonumber(t) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
return 1
"""


class JobNotFoundError(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


def intent_member(job_id: str, index: int) -> str:
    return f"{job_id}:{index}"


def parse_member(member: str) -> tuple[str, int]:
    job_id, _, idx = member.rpartition(":")
    return job_id, int(idx)


class RedisStore:
    """Thread-safe (one connection pool); cheap to create."""

    def __init__(self, redis_url: str, namespace: str = "il2"):
        self.redis_url = redis_url
        # Timeouts so that a partitioned Redis raises instead of hanging a supervisor (XREAD blocks
        # for at most a few seconds, below socket_timeout).
        self.r = redis.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=5,
                                      socket_timeout=15)
        self.ns = namespace

    # ---- keys ---------------------------------------------------------------------------------
    def _k(self, *parts: Any) -> str:
        return ":".join((self.ns, *map(str, parts)))

    def job_key(self, job_id: str) -> str:
        return self._k("job", job_id)

    def lease_key(self, job_id: str, index: int) -> str:
        return self._k("lease", job_id, index)

    def fence_key(self, job_id: str, index: int) -> str:
        return self._k("fence", job_id, index)

    def cancel_key(self, job_id: str) -> str:
        return self._k("cancel", job_id)

    def stage_events_key(self, job_id: str, index: int, attempt: int) -> str:
        return self._k("stage-events", job_id, index, attempt)

    @property
    def intents_key(self) -> str:
        return self._k("dispatch")

    @property
    def running_key(self) -> str:
        return self._k("running")

    @property
    def index_key(self) -> str:
        return self._k("jobs")

    # ---- records ------------------------------------------------------------------------------
    def ping(self) -> bool:
        return bool(self.r.ping())

    def load(self, job_id: str) -> Job:
        raw = self.r.get(self.job_key(job_id))
        if raw is None:
            raise JobNotFoundError(job_id)
        return Job.from_dict(json.loads(raw))

    def create(self, job: Job, idempotency_key: str, fx: Effects) -> str | None:
        """Store a new job with its events and intents (one MULTI); returns the id of an earlier job
        holding ``idempotency_key`` instead (then nothing is stored)."""
        idem = self._k("idem", idempotency_key)
        while True:
            with self.r.pipeline() as pipe:
                try:
                    if idempotency_key:
                        pipe.watch(idem)
                        existing = pipe.get(idem)
                        if existing:
                            pipe.unwatch()
                            return existing
                    pipe.multi()
                    if idempotency_key:
                        pipe.set(idem, job.job_id)
                    pipe.zadd(self.index_key, {job.job_id: job.create_time})
                    self._write(pipe, job, fx, lease_token="", lease_ttl_s=0)
                    pipe.execute()
                    return None
                except redis.WatchError:
                    continue

    def transact(self, job_id: str, decide: Callable[[Job, dict[int, str | None], Effects], Any], *,
                 now: float, leases: Sequence[int] = (), lease_token: str = "",
                 lease_ttl_s: float = 0) -> tuple[Any, Effects, Job]:
        """Run ``decide(job, {index: lease value}, effects)`` under WATCH of the record and the
        leases of ``leases``, and commit what it changed in one MULTI (retried on a concurrent
        change). A lease the decision takes gets ``lease_token`` for ``lease_ttl_s``."""
        key = self.job_key(job_id)
        lease_keys = {i: self.lease_key(job_id, i) for i in leases}
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key, *lease_keys.values())
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFoundError(job_id)
                    job = Job.from_dict(json.loads(raw))
                    held = {i: pipe.get(k) for i, k in lease_keys.items()}
                    fx = Effects(now=now)
                    result = decide(job, held, fx)
                    if not fx.changed:
                        pipe.unwatch()
                        return result, fx, job
                    pipe.multi()
                    self._write(pipe, job, fx, lease_token, lease_ttl_s)
                    pipe.execute()
                    return result, fx, job
                except redis.WatchError:
                    continue

    def _write(self, pipe: Any, job: Job, fx: Effects, lease_token: str, lease_ttl_s: float) -> None:
        job_id = job.job_id
        pipe.set(self.job_key(job_id), json.dumps(job.to_dict()))
        for stage, kind, data in fx.events:
            payload = json.dumps({"t": fx.now, "s": stage, "k": kind, "d": data})
            pipe.eval(_APPEND_EVENT, 2, self._k("job", job_id, "seq"), self._k("job", job_id, "events"), payload)
        for i in fx.drop_leases:
            pipe.delete(self.lease_key(job_id, i), self.fence_key(job_id, i))
            pipe.srem(self.running_key, intent_member(job_id, i))
        if fx.take_lease is not None:
            i = fx.take_lease
            pipe.set(self.lease_key(job_id, i), lease_token, px=max(1, int(lease_ttl_s * 1000)))
            pipe.set(self.fence_key(job_id, i), job.stages[i].attempt, px=max(1, int(lease_ttl_s * 1000)))
            pipe.sadd(self.running_key, intent_member(job_id, i))
        if fx.drop_intents:
            pipe.zrem(self.intents_key, *(intent_member(job_id, i) for i in fx.drop_intents))
        for i in fx.due:
            pipe.zadd(self.intents_key, {intent_member(job_id, i): fx.now})
        if fx.clear_cancel:
            pipe.delete(self.cancel_key(job_id))
        if fx.set_cancel is not None:
            pipe.set(self.cancel_key(job_id), fx.set_cancel)

    # ---- leases -------------------------------------------------------------------------------
    def renew_lease(self, job_id: str, index: int, token: str, ttl_s: float) -> bool:
        return bool(self.r.eval(_RENEW_LEASE, 2, self.lease_key(job_id, index), self.fence_key(job_id, index), token,
                                int(ttl_s * 1000)))

    def lease_exists(self, job_id: str, index: int) -> bool:
        return bool(self.r.exists(self.lease_key(job_id, index)))

    def running_members(self) -> list[tuple[str, int]]:
        return [parse_member(m) for m in self.r.smembers(self.running_key)]

    def forget_running(self, job_id: str, index: int) -> None:
        self.r.srem(self.running_key, intent_member(job_id, index))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self.cancel_key(job_id)))

    def pop_list(self, key: str, count: int) -> list[str]:
        """Up to ``count`` entries from the head of a list (events pushed by stage pods)."""
        return self.r.lpop(key, count) or []

    # ---- dispatch intents ---------------------------------------------------------------------
    def intents(self, older_than: float) -> list[tuple[str, int, float]]:
        """(job_id, index, recorded) of intents recorded before ``older_than`` (Unix time)."""
        return [(*parse_member(m), t) for m, t in
                self.r.zrangebyscore(self.intents_key, "-inf", older_than, withscores=True)]

    def swap_intent(self, job_id: str, index: int, seen: float, new: float | None) -> bool:
        """Re-arm (``new``) or drop (None) an intent if it is still the one recorded at ``seen``."""
        return bool(self.r.eval(_SWAP_INTENT, 1, self.intents_key, intent_member(job_id, index), repr(seen),
                                "" if new is None else repr(new)))

    # ---- event streams ------------------------------------------------------------------------
    def read_events(self, job_id: str, after_sequence: int, block_s: float) -> list[JobEvent]:
        stream = self._k("job", job_id, "events")
        res = self.r.xread({stream: f"0-{after_sequence}"}, count=256, block=max(1, int(block_s * 1000)))
        return [self._parse_event(job_id, i, f) for _, entries in res or [] for i, f in entries]

    def events(self, job_id: str, after_sequence: int = 0) -> list[JobEvent]:
        entries = self.r.xrange(self._k("job", job_id, "events"), f"(0-{after_sequence}", "+")
        return [self._parse_event(job_id, i, f) for i, f in entries]

    def last_sequence(self, job_id: str) -> int:
        return int(self.r.get(self._k("job", job_id, "seq")) or 0)

    @staticmethod
    def _parse_event(job_id: str, entry_id: str, fields: Mapping[str, str]) -> JobEvent:
        e = json.loads(fields["e"])
        return JobEvent(job_id=job_id, sequence=int(entry_id.split("-")[1]), time=e["t"], stage=e["s"],
                        kind=e["k"], data=e["d"])

    # ---- index --------------------------------------------------------------------------------
    def newest_first(self, max_score: str, batch: int = 200) -> list[tuple[str, float]]:
        return self.r.zrevrangebyscore(self.index_key, max_score, "-inf", start=0, num=batch, withscores=True)

    def iter_ids(self) -> Iterator[str]:
        yield from self.r.zrange(self.index_key, 0, -1)
