"""A job store in Redis, for deployments where the JobRunner may restart on another node.

Records and result bytes both live in Redis, so nothing depends on a node's local disk: a runner
restarted anywhere in the cluster finds every job and can serve every file. (Keeping files in a
shared directory instead would need a shared filesystem on every node, a second thing to keep
consistent with the records.) Results are small next to Redis' 512 MB value limit: PNGs of some
hundred KB, MP4s of some MB, and they are deleted with their job after the TTL.

Layout, under a key prefix P (default `genserve:jobs`):

    P:job:<id>          hash: state, kind, seq, version, attempts, times, progress, error, files
    P:req:<id>          the request JSON        P:res:<id>    the result JSON
    P:hist:<id>         list: one JSON entry per state change
    P:file:<id>:<name>  a result file's bytes
    P:idem:<key>        idempotency key (scoped to its owner: "<owner>:<key>") -> job id
    P:owner:<owner>     sorted set of the owner's job ids by seq (listing one owner's jobs)
    P:active:<owner>    set of the owner's queued and running job ids (the active-jobs quota)
    P:seq               submission counter
    P:all, P:state:<s>  sorted sets of job ids by seq (listing, filtering, paging)
    P:queue:<kind>      sorted set of queued job ids by seq (queue position, counts)
    P:fq:<kind>:<group>:<priority>  sorted set of a group's queued job ids by seq (the fair claim)
    P:fgroups:<kind>    set of the groups that may have queued jobs of the kind
    P:frun:<group>      set of the group's running job ids
    P:fuse:<group>      hash: the group's decayed GPU-seconds, jobs and as-of time (fairness.py)
    P:queued:<owner>    set of the owner's queued job ids (the queued-jobs cap)
    P:expiry            sorted set of finished job ids by expiry time (the TTL sweep)
    P:dl:<msg id>       hash: a webhook or A2A push delivery of a job's end (serve_app.jobs.webhooks)
    P:dls:<id>          list: the job's delivery ids, in the order of its targets
    P:due               sorted set of pending delivery ids by their next attempt's time
    P:lease             the runner lease: "<owner>|<epoch>", with a TTL (PX) the holder renews
    P:epoch             lease counter: every acquire gets the next, so a token is never reused

Every change is one Lua script, so it is atomic: a compare-and-set on state and attempt, and the
index sets move with the record. A runner's own changes also carry its lease token and are
refused ("FENCED", `LeaseLost`) unless P:lease still holds that token, in the same script: a
runner that lost its lease (it stalled past the TTL, another took over) writes nothing. Finished jobs are deleted by the sweep at `expires_at`; their
keys also get a Redis TTL a day past that, so they go even if no runner is left to sweep.

Durability is Redis' own: run it with `appendonly yes` (and `appendfsync always` for the same
guarantee as the SQLite store's fsync before each acknowledged submit; `everysec`, Redis' default
with AOF, can lose the last second). Single Redis or Sentinel; not Redis Cluster (the scripts
touch keys of one job and the shared indexes together).
"""

from __future__ import annotations

import json
import logging
import math
import uuid

from serve_app.jobs.fairness import PRIORITIES, PRIORITY_RANK, FairPolicy, GroupUsage, Queued, group_of
from serve_app.jobs.model import (
    QUEUED,
    STATES,
    SUCCEEDED,
    ActiveJobsExceeded,
    Job,
    QueuedJobsExceeded,
    ResultFile,
    dumps,
    scoped_idempotency_key,
)
from serve_app.jobs.store import CANCEL_REASON, CANCELLED_AT_REQUEUE, JobStore, LeaseLost, _now

BACKSTOP_S = 86400  # Redis TTL past `expires_at`, in case no runner sweeps

_FENCE = """
-- A runner's write carries its lease token; refused unless the lease is still that token.
local function fenced(P, fence)
  return fence ~= '' and redis.call('GET', P .. ':lease') ~= fence
end
local FENCED = 'FENCED: this runner no longer holds the job runner lease'
"""

_LIB = _FENCE + """
local function hist(P, id, state, now, attempt, reason)
  local entry = '{"state":' .. cjson.encode(state) .. ',"at":' .. now .. ',"attempt":' .. attempt
  if reason ~= nil and reason ~= '' then entry = entry .. ',"reason":' .. cjson.encode(reason) end
  redis.call('RPUSH', P .. ':hist:' .. id, entry .. '}')
end

-- The requeue just recorded spent no attempt: as model.with_requeue, when the two entries before
-- it are such a requeue and the claim it ended, they become this entry, its count one more.
local function coalesce_requeue(P, id)
  local key = P .. ':hist:' .. id
  local entry = redis.call('RPOP', key)
  local count = 1
  if redis.call('LLEN', key) >= 2 then
    local claim = cjson.decode(redis.call('LINDEX', key, -1))
    local before = cjson.decode(redis.call('LINDEX', key, -2))
    if claim.state == 'running' and type(before.requeues) == 'number' then
      count = before.requeues + 1
      redis.call('RPOP', key)
      redis.call('RPOP', key)
    end
  end
  -- The entry as hist() wrote it, with its count added (its time is kept exactly as written).
  redis.call('RPUSH', key, string.sub(entry, 1, -2) .. ',"requeues":' .. count .. '}')
end

local function is_terminal(state)
  return state == 'succeeded' or state == 'failed' or state == 'cancelled'
end

-- A job's end, told to its targets: a pending delivery per target that wants the event, made in
-- the same script as the end itself (as model.new_deliveries; ids by the target's position).
local function add_deliveries(P, id, job, to, now)
  local targets = redis.call('HGET', job, 'targets')
  if not targets then return end
  local event = 'job.' .. to
  local owner = redis.call('HGET', job, 'owner')
  for index, target in ipairs(cjson.decode(targets)) do
    local wants = target.events == nil
    if not wants then
      for _, name in ipairs(target.events) do if name == event then wants = true end end
    end
    if wants then
      local did = 'msg_' .. id .. '_' .. (index - 1)
      local key = P .. ':dl:' .. did
      if redis.call('EXISTS', key) == 0 then
        redis.call('HSET', key, 'id', did, 'job_id', id, 'target', cjson.encode(target), 'event', event,
                   'state', 'pending', 'attempts', 0, 'next_at', now, 'created_at', now)
        if owner then redis.call('HSET', key, 'owner', owner) end
        redis.call('ZADD', P .. ':due', now, did)
        redis.call('RPUSH', P .. ':dls:' .. id, did)
      end
    end
  end
end

-- Set the state of job `id` (hash key `job`, currently `from`), moving it between the index sets,
-- recording the change, and scheduling expiry when it is final.
local function set_state(P, id, job, from, to, now, expires, backstop, reason)
  redis.call('HSET', job, 'state', to)
  redis.call('HINCRBY', job, 'version', 1)
  if from == to then return end
  local seq = redis.call('HGET', job, 'seq')
  local kind = redis.call('HGET', job, 'kind')
  redis.call('ZREM', P .. ':state:' .. from, id)
  redis.call('ZADD', P .. ':state:' .. to, seq, id)
  local grp = redis.call('HGET', job, 'grp')
  local lane = P .. ':fq:' .. kind .. ':' .. grp .. ':' .. redis.call('HGET', job, 'priority')
  local running = P .. ':frun:' .. grp
  local owner_queue = P .. ':queued:' .. (redis.call('HGET', job, 'owner') or '')
  if from == 'queued' then
    redis.call('ZREM', P .. ':queue:' .. kind, id)
    redis.call('ZREM', lane, id)
    redis.call('SREM', owner_queue, id)
  end
  if to == 'queued' then
    redis.call('ZADD', P .. ':queue:' .. kind, seq, id)
    redis.call('ZADD', lane, seq, id)
    redis.call('SADD', P .. ':fgroups:' .. kind, grp)
    redis.call('SADD', owner_queue, id)
  end
  if from == 'running' then redis.call('SREM', running, id) end
  if to == 'running' then
    redis.call('SADD', running, id)
    redis.call('SADD', P .. ':fusers', grp)
  end
  hist(P, id, to, now, redis.call('HGET', job, 'attempts'), reason)
  if is_terminal(to) then
    local owner = redis.call('HGET', job, 'owner')
    if owner then redis.call('SREM', P .. ':active:' .. owner, id) end
    redis.call('HSET', job, 'finished_at', now, 'expires_at', expires)
    redis.call('ZADD', P .. ':expiry', expires, id)
    add_deliveries(P, id, job, to, now)
    local ttl = tonumber(backstop)
    for _, key in ipairs({job, P .. ':req:' .. id, P .. ':res:' .. id, P .. ':hist:' .. id, P .. ':dls:' .. id}) do
      redis.call('EXPIRE', key, ttl)
    end
    for _, did in ipairs(redis.call('LRANGE', P .. ':dls:' .. id, 0, -1)) do redis.call('EXPIRE', P .. ':dl:' .. did, ttl) end
    local files = redis.call('HGET', job, 'files')
    if files then
      for _, file in ipairs(cjson.decode(files)) do redis.call('EXPIRE', P .. ':file:' .. id .. ':' .. file.name, ttl) end
    end
    local idem = redis.call('HGET', job, 'idempotency_key')
    if idem then redis.call('EXPIRE', P .. ':idem:' .. idem, ttl) end
  end
end
"""

_CREATE = _LIB + """
local P, id, kind, now, request, idem, hash, owner, max_active, grp, priority, max_queued, targets = unpack(ARGV)
if idem ~= '' then
  local existing = redis.call('GET', P .. ':idem:' .. idem)
  if existing and redis.call('EXISTS', P .. ':job:' .. existing) == 1 then return {existing, 0} end
end
if owner ~= '' and max_active ~= '' and redis.call('SCARD', P .. ':active:' .. owner) >= tonumber(max_active) then
  return {'', -1}
end
if owner ~= '' and max_queued ~= '' and redis.call('SCARD', P .. ':queued:' .. owner) >= tonumber(max_queued) then
  return {'', -2}
end
local seq = redis.call('INCR', P .. ':seq')
local job = P .. ':job:' .. id
redis.call('HSET', job, 'id', id, 'kind', kind, 'state', 'queued', 'seq', seq, 'version', 1, 'attempts', 0,
           'cancel_requested', 0, 'created_at', now, 'files', '[]', 'grp', grp, 'priority', priority)
if idem ~= '' then
  redis.call('HSET', job, 'idempotency_key', idem)
  redis.call('SET', P .. ':idem:' .. idem, id)
end
if hash ~= '' then redis.call('HSET', job, 'request_hash', hash) end
if targets ~= '' then redis.call('HSET', job, 'targets', targets) end
if owner ~= '' then
  redis.call('HSET', job, 'owner', owner)
  redis.call('ZADD', P .. ':owner:' .. owner, seq, id)
  redis.call('SADD', P .. ':active:' .. owner, id)
end
redis.call('SET', P .. ':req:' .. id, request)
hist(P, id, 'queued', now, 0, nil)
redis.call('ZADD', P .. ':all', seq, id)
redis.call('ZADD', P .. ':state:queued', seq, id)
redis.call('ZADD', P .. ':queue:' .. kind, seq, id)
redis.call('ZADD', P .. ':fq:' .. kind .. ':' .. grp .. ':' .. priority, seq, id)
redis.call('SADD', P .. ':fgroups:' .. kind, grp)
redis.call('SADD', P .. ':queued:' .. owner, id)
return {id, 1}
"""

_FAIR = """
-- fairness.py, mirrored: a group's decayed usage, its normalised cost, a job's virtual time.
local function fair_cost(P, grp, weight, now, policy)
  local use = redis.call('HMGET', P .. ':fuse:' .. grp, 'seconds', 'jobs', 'at')
  local seconds, jobs, at = tonumber(use[1]) or 0, tonumber(use[2]) or 0, tonumber(use[3]) or now
  local factor = math.pow(0.5, math.max(0, now - at) / policy.half_life)
  local per_job = policy.estimate
  if jobs > 0 then per_job = seconds / jobs end
  return (seconds * factor + redis.call('SCARD', P .. ':frun:' .. grp) * per_job) / weight
end
"""

_CLAIM = _LIB + _FAIR + """
local P, now, fence, policy = ARGV[1], tonumber(ARGV[2]), ARGV[3], cjson.decode(ARGV[4])
if fenced(P, fence) then return redis.error_reply(FENCED) end
-- The least normalised cost, then the earliest virtual time, then seq (fairness.pick).
local best, best_key = nil, nil
for i = 5, #ARGV do
  local groups = P .. ':fgroups:' .. ARGV[i]
  for _, grp in ipairs(redis.call('SMEMBERS', groups)) do
    local weight = policy.weights[grp] or policy.default
    local any = false
    for priority = 0, 2 do
      local head = redis.call('ZRANGE', P .. ':fq:' .. ARGV[i] .. ':' .. grp .. ':' .. priority, 0, 0, 'WITHSCORES')
      if head[1] then
        any = true
        if weight > 0 then
          local created = tonumber(redis.call('HGET', P .. ':job:' .. head[1], 'created_at'))
          local key = {fair_cost(P, grp, weight, now, policy), created + (1 - priority) * policy.age, tonumber(head[2])}
          if best_key == nil or key[1] < best_key[1] or (key[1] == best_key[1] and (key[2] < best_key[2]
              or (key[2] == best_key[2] and key[3] < best_key[3]))) then
            best, best_key = head[1], key
          end
        end
      end
    end
    if not any then redis.call('SREM', groups, grp) end
  end
end
if best == nil then return false end
local job = P .. ':job:' .. best
redis.call('HINCRBY', job, 'attempts', 1)
redis.call('HSET', job, 'started_at', ARGV[2])
redis.call('HDEL', job, 'progress')
set_state(P, best, job, 'queued', 'running', ARGV[2], '', '', nil)
return best
"""

_RECORD_USAGE = _FENCE + """
local P, grp, seconds, now, half_life, fence = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
if fenced(P, fence) then return redis.error_reply(FENCED) end
local key = P .. ':fuse:' .. grp
local use = redis.call('HMGET', key, 'seconds', 'jobs', 'at')
local factor = math.pow(0.5, math.max(0, now - (tonumber(use[3]) or now)) / half_life)
redis.call('HSET', key, 'seconds', tostring((tonumber(use[1]) or 0) * factor + seconds),
           'jobs', tostring((tonumber(use[2]) or 0) * factor + 1), 'at', ARGV[4])
redis.call('SADD', P .. ':fusers', grp)
return true
"""

_TRANSITION = _LIB + """
local P, id, expect, to, attempt, now, expires, backstop, reason, has_error, err, cancel, refund, fence,
      cancel_reason = unpack(ARGV)
if fenced(P, fence) then return redis.error_reply(FENCED) end
local job = P .. ':job:' .. id
local state = redis.call('HGET', job, 'state')
if not state then return false end
local allowed = false
for s in string.gmatch(expect, '[^,]+') do if s == state then allowed = true end end
if not allowed then return false end
if attempt ~= '' and redis.call('HGET', job, 'attempts') ~= attempt then return false end
-- A cancel asked for while it ran wins over a requeue: never back in the queue to run again.
if state == 'running' and to == 'queued' and cancel ~= '0' and redis.call('HGET', job, 'cancel_requested') == '1' then
  to, reason, refund = 'cancelled', cancel_reason, '0'
end
if has_error == '1' then redis.call('HSET', job, 'error', err) end
if cancel ~= '' then redis.call('HSET', job, 'cancel_requested', cancel) end
set_state(P, id, job, state, to, now, expires, backstop, reason)
if refund == '1' and to == 'queued' and state == 'running' then coalesce_requeue(P, id) end
if refund == '1' and tonumber(redis.call('HGET', job, 'attempts')) > 0 then redis.call('HINCRBY', job, 'attempts', -1) end
return true
"""

_CANCEL = _LIB + """
local P, id, now, expires, backstop, reason = unpack(ARGV)
local job = P .. ':job:' .. id
local state = redis.call('HGET', job, 'state')
if not state then return -1 end
if state == 'queued' then
  set_state(P, id, job, state, 'cancelled', now, expires, backstop, reason)
  return 1
end
if state == 'running' then
  redis.call('HSET', job, 'cancel_requested', 1)
  set_state(P, id, job, state, state, now, expires, backstop, nil)
  return 1
end
return 0
"""

_PROGRESS = _FENCE + """
local P, id, attempt, progress, fence = unpack(ARGV)
if fenced(P, fence) then return redis.error_reply(FENCED) end
local job = P .. ':job:' .. id
if redis.call('HGET', job, 'state') ~= 'running' or redis.call('HGET', job, 'attempts') ~= attempt
   or redis.call('HGET', job, 'cancel_requested') == '1' then
  return false
end
redis.call('HSET', job, 'progress', progress)
redis.call('HINCRBY', job, 'version', 1)
return true
"""

_SAVE_RESULT = _LIB + """
local P, id, attempt, now, expires, backstop, result, files = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if fenced(P, ARGV[9]) then return redis.error_reply(FENCED) end
local job = P .. ':job:' .. id
if redis.call('HGET', job, 'state') ~= 'running' or redis.call('HGET', job, 'attempts') ~= attempt
   or redis.call('HGET', job, 'cancel_requested') == '1' then
  return false
end
for i = 10, #ARGV, 2 do redis.call('SET', P .. ':file:' .. id .. ':' .. ARGV[i], ARGV[i + 1]) end
redis.call('SET', P .. ':res:' .. id, result)
redis.call('HSET', job, 'files', files)
set_state(P, id, job, 'running', 'succeeded', now, expires, backstop, nil)
return true
"""

_REMOVE = """
-- Delete finished job `id` and everything of it.
local function remove(P, id)
  local job = P .. ':job:' .. id
  local files = redis.call('HGET', job, 'files')
  if files then
    for _, file in ipairs(cjson.decode(files)) do redis.call('DEL', P .. ':file:' .. id .. ':' .. file.name) end
  end
  local idem = redis.call('HGET', job, 'idempotency_key')
  if idem and redis.call('GET', P .. ':idem:' .. idem) == id then redis.call('DEL', P .. ':idem:' .. idem) end
  local owner = redis.call('HGET', job, 'owner')
  if owner then redis.call('ZREM', P .. ':owner:' .. owner, id) end
  for _, did in ipairs(redis.call('LRANGE', P .. ':dls:' .. id, 0, -1)) do
    redis.call('DEL', P .. ':dl:' .. did)
    redis.call('ZREM', P .. ':due', did)
  end
  redis.call('DEL', job, P .. ':req:' .. id, P .. ':res:' .. id, P .. ':hist:' .. id, P .. ':dls:' .. id)
  for _, state in ipairs({'succeeded', 'failed', 'cancelled'}) do redis.call('ZREM', P .. ':state:' .. state, id) end
  redis.call('ZREM', P .. ':all', id)
  redis.call('ZREM', P .. ':expiry', id)
end
"""

_EXPIRE = _FENCE + _REMOVE + """
local P, now, limit, fence = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if fenced(P, fence) then return redis.error_reply(FENCED) end
local ids = redis.call('ZRANGEBYSCORE', P .. ':expiry', '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do remove(P, id) end
return #ids
"""

_DELETE = _REMOVE + """
local P, id = ARGV[1], ARGV[2]
local state = redis.call('HGET', P .. ':job:' .. id, 'state')
if not state then return -1 end
if state ~= 'succeeded' and state ~= 'failed' and state ~= 'cancelled' then return 0 end
remove(P, id)
return 1
"""

_PUT_TARGET = """
local P, id, target_id, target = unpack(ARGV)
local job = P .. ':job:' .. id
local state = redis.call('HGET', job, 'state')
if not state then return -1 end
local raw = redis.call('HGET', job, 'targets')
local kept = {}
if raw then
  for _, t in ipairs(cjson.decode(raw)) do if t.id ~= target_id then table.insert(kept, t) end end
end
table.insert(kept, cjson.decode(target))
redis.call('HSET', job, 'targets', cjson.encode(kept))
redis.call('HINCRBY', job, 'version', 1)
return 1
"""

_DELETE_TARGET = """
local P, id, target_id = unpack(ARGV)
local job = P .. ':job:' .. id
if redis.call('EXISTS', job) == 0 then return -1 end
local raw = redis.call('HGET', job, 'targets')
if not raw then return 0 end
local kept, removed = {}, 0
for _, t in ipairs(cjson.decode(raw)) do
  if t.id ~= target_id then table.insert(kept, t) else removed = 1 end
end
if removed == 0 then return 0 end
if #kept == 0 then redis.call('HDEL', job, 'targets') else redis.call('HSET', job, 'targets', cjson.encode(kept)) end
redis.call('HINCRBY', job, 'version', 1)
return 1
"""

_RECORD_DELIVERY = _FENCE + """
local P, did, attempt, state, next_at, last_status, last_error, delivered_at, fence = unpack(ARGV)
if fenced(P, fence) then return redis.error_reply(FENCED) end
local key = P .. ':dl:' .. did
if redis.call('HGET', key, 'state') ~= 'pending' or tonumber(redis.call('HGET', key, 'attempts')) ~= tonumber(attempt) - 1 then
  return false
end
redis.call('HSET', key, 'attempts', attempt, 'state', state)
local optional = {next_at = next_at, last_status = last_status, last_error = last_error, delivered_at = delivered_at}
for name, value in pairs(optional) do
  if value == '' then redis.call('HDEL', key, name) else redis.call('HSET', key, name, value) end
end
if state == 'pending' then redis.call('ZADD', P .. ':due', next_at, did) else redis.call('ZREM', P .. ':due', did) end
return true
"""

_MIGRATE = """
-- Jobs recorded before fair queueing have no group: each owner's its own, priority normal, and
-- the queued ones enter their group's lane (once; jobs with a group are left as they are).
local P = ARGV[1]
local moved = 0
for _, state in ipairs({'queued', 'running'}) do
  for _, id in ipairs(redis.call('ZRANGE', P .. ':state:' .. state, 0, -1)) do
    local job = P .. ':job:' .. id
    if not redis.call('HGET', job, 'grp') then
      local grp = redis.call('HGET', job, 'owner') or 'local'
      redis.call('HSET', job, 'grp', grp, 'priority', 1)
      if state == 'queued' then
        local kind = redis.call('HGET', job, 'kind')
        redis.call('ZADD', P .. ':fq:' .. kind .. ':' .. grp .. ':1', redis.call('HGET', job, 'seq'), id)
        redis.call('SADD', P .. ':fgroups:' .. kind, grp)
        redis.call('SADD', P .. ':queued:' .. (redis.call('HGET', job, 'owner') or ''), id)
      else
        redis.call('SADD', P .. ':frun:' .. grp, id)
        redis.call('SADD', P .. ':fusers', grp)
      end
      moved = moved + 1
    end
  end
end
return moved
"""

_ACQUIRE = """
local P, owner, ttl = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('GET', P .. ':lease')
if current and string.sub(current, 1, #owner + 1) ~= owner .. '|' then return false end
local token = owner .. '|' .. redis.call('INCR', P .. ':epoch')
redis.call('SET', P .. ':lease', token, 'PX', ttl)
return token
"""

_RENEW = """
if redis.call('GET', ARGV[1] .. ':lease') ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', ARGV[1] .. ':lease', ARGV[3])
return 1
"""

_RELEASE = """
if redis.call('GET', ARGV[1] .. ':lease') ~= ARGV[2] then return 0 end
redis.call('DEL', ARGV[1] .. ':lease')
return 1
"""


logger = logging.getLogger("ray.serve")


class RedisNotDurable(RuntimeError):
    """The Redis server would lose or evict jobs: the store refuses to start, saying what to change."""


def _config_value(client, name: str) -> str:
    """One CONFIG GET value as text (redis-py answers with str or bytes keys, by version and options)."""
    found = {(key.decode() if isinstance(key, bytes) else key): value for key, value in client.config_get(name).items()}
    value = found.get(name, "")
    return value.decode() if isinstance(value, bytes) else str(value)


def check_durability(client, on_forbidden: str = "refuse") -> list[str]:
    """Refuse a Redis that keeps jobs only in memory or may evict them: `appendonly yes` and
    `maxmemory-policy noeviction` are required. Where CONFIG GET is forbidden (managed Redis),
    refuse, or with `on_forbidden="warn"` log a warning and go on. Returns the warnings."""
    import redis

    try:
        appendonly = _config_value(client, "appendonly")
        policy = _config_value(client, "maxmemory-policy")
    except redis.ResponseError as error:
        message = (f"cannot read the Redis server's persistence settings (CONFIG GET: {str(error)[:120]}); "
                   "jobs need appendonly yes and maxmemory-policy noeviction")
        if on_forbidden != "warn":
            raise RedisNotDurable(message + ". If your provider guarantees both, set jobs.redis_config_check: warn") \
                from None
        logger.warning("%s; going on because jobs.redis_config_check is warn", message)
        return [message]
    problems = []
    if appendonly != "yes":
        problems.append(f"appendonly is {appendonly or 'unset'}: a restart would lose every job (set appendonly yes)")
    if policy != "noeviction":
        problems.append(f"maxmemory-policy is {policy or 'unset'}: Redis could evict job records under memory "
                        "pressure (set maxmemory-policy noeviction)")
    if problems:
        raise RedisNotDurable("the Redis job store refuses this server: " + "; ".join(problems))
    return []


class RedisJobStore(JobStore):
    leases = True

    def __init__(self, url: str, ttl_s: float = 86400.0, prefix: str = "genserve:jobs",
                 connect_timeout_s: float = 5.0, socket_timeout_s: float = 10.0, config_check: str = "refuse",
                 password: str | None = None):
        import redis

        super().__init__(ttl_s)
        self.prefix = prefix
        # The lease token this store's runner writes carry ("" until a lease is acquired: unfenced).
        self._fence = ""
        # Timeouts: an unreachable or stalled Redis fails a store call (the dispatcher logs it and
        # tries again; a submit answers 5xx) instead of hanging a worker thread forever.
        # `password`: from the environment or a file (JobsConfig.redis_password); None keeps the URL's own.
        secret = {} if password is None else {"password": password}
        self._redis = redis.Redis.from_url(url, decode_responses=False, health_check_interval=30,
                                           socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
                                           **secret)
        check_durability(self._redis, config_check)
        self._create = self._redis.register_script(_CREATE)
        self._claim = self._redis.register_script(_CLAIM)
        self._record_usage = self._redis.register_script(_RECORD_USAGE)
        self._transition = self._redis.register_script(_TRANSITION)
        self._cancel = self._redis.register_script(_CANCEL)
        self._progress = self._redis.register_script(_PROGRESS)
        self._save_result = self._redis.register_script(_SAVE_RESULT)
        self._expire = self._redis.register_script(_EXPIRE)
        self._delete = self._redis.register_script(_DELETE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._put_target = self._redis.register_script(_PUT_TARGET)
        self._delete_target = self._redis.register_script(_DELETE_TARGET)
        self._record_delivery = self._redis.register_script(_RECORD_DELIVERY)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._redis.register_script(_MIGRATE)(args=[self.prefix])

    # The runner lease

    def acquire_lease(self, owner, ttl_s):
        token = self._acquire(args=[self.prefix, owner, _millis(ttl_s)])
        if token is None:
            return False
        self._fence = token.decode()
        return True

    def renew_lease(self, ttl_s):
        return bool(self._fence) and bool(self._renew(args=[self.prefix, self._fence, _millis(ttl_s)]))

    def release_lease(self):
        if self._fence:
            self._release(args=[self.prefix, self._fence])

    def _runner_write(self, script, args: list):
        """Run a runner's write, fenced by this store's lease token (LeaseLost once it is gone)."""
        import redis

        try:
            return script(args=args)
        except redis.ResponseError as error:
            if str(error).startswith("FENCED"):
                raise LeaseLost(str(error)) from None
            raise

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _expiry_args(self, now: float) -> tuple[str, str]:
        return repr(now + self.ttl_s), str(math.ceil(self.ttl_s) + BACKSTOP_S)

    def create(self, kind, request, *, idempotency_key=None, request_hash=None, now=None, owner=None,
               max_active=None, group=None, priority="normal", max_queued=None, targets=None):
        job_id, created = self._create(args=[
            self.prefix, uuid.uuid4().hex, kind, repr(_now(now)), dumps(request),
            scoped_idempotency_key(owner, idempotency_key) or "", request_hash or "", owner or "",
            "" if max_active is None or owner is None else str(max_active), group_of(owner, group),
            str(PRIORITY_RANK[priority]), "" if max_queued is None or owner is None else str(max_queued),
            dumps(targets) if targets else "",
        ])
        if created == -1:
            raise ActiveJobsExceeded(owner, max_active)
        if created == -2:
            raise QueuedJobsExceeded(owner, max_queued)
        return self.get(job_id.decode()), bool(created)

    def find_idempotent(self, owner, idempotency_key):
        job_id = self._redis.get(self._key("idem", scoped_idempotency_key(owner, idempotency_key)))
        return None if job_id is None else self.get(job_id.decode())

    def get(self, job_id, with_request=False):
        return self._load([job_id], with_request)[0]

    def _load(self, ids: list[str], with_request: bool = False) -> list[Job | None]:
        # MULTI/EXEC: one snapshot, so a delete or expiry landing between the reads of a job
        # cannot give a record without its history or result (a result read would answer 500).
        pipe = self._redis.pipeline(transaction=True)
        for job_id in ids:
            pipe.hgetall(self._key("job", job_id))
            pipe.lrange(self._key("hist", job_id), 0, -1)
            pipe.get(self._key("res", job_id))
            if with_request:
                pipe.get(self._key("req", job_id))
        replies = pipe.execute()
        width = 4 if with_request else 3
        jobs = []
        for start in range(0, len(replies), width):
            fields, history, result, *request = replies[start:start + width]
            jobs.append(_job(fields, history, result, request[0] if request else None) if fields else None)
        return jobs

    def counts(self):
        pipeline = self._redis.pipeline()
        for state in STATES:
            pipeline.zcard(self._key("state", state))
        return dict(zip(STATES, pipeline.execute(), strict=True))

    def list(self, state=None, limit=20, before=None, owner=None):
        top = f"({before}" if before is not None else "+inf"
        if owner is None:
            index = self._key("state", state) if state is not None else self._key("all")
            ids = [raw.decode() for raw in self._redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit)]
            return [job for job in self._load(ids) if job is not None]
        # One owner's jobs, newest first, filtered by state a page at a time.
        jobs: list[Job] = []
        index = self._key("owner", owner)
        while len(jobs) < limit:
            ids = [raw.decode() for raw in self._redis.zrevrangebyscore(index, top, "-inf", start=0, num=max(limit, 50))]
            if not ids:
                break
            page = [job for job in self._load(ids) if job is not None]
            jobs += [job for job in page if state is None or job.state == state]
            if len(ids) < max(limit, 50) or not page:
                break
            top = f"({page[-1].seq}"
        return jobs[:limit]

    def active_count(self, owner):
        return self._redis.scard(self._key("active", owner))

    def delete(self, job_id):
        outcome = self._delete(args=[self.prefix, job_id])
        return None if outcome == -1 else bool(outcome)

    def queue_position(self, job):
        if job.state != QUEUED:
            return None
        return self._redis.zcount(self._key("queue", job.kind), "-inf", f"({job.seq}") + 1

    def claim(self, kinds, now=None, policy=None):
        kinds = list(kinds)
        if not kinds:
            return None
        policy = json.dumps((policy or FairPolicy()).to_json())
        job_id = self._runner_write(self._claim, [self.prefix, repr(_now(now)), self._fence, policy, *kinds])
        return None if job_id is None else self.get(job_id.decode(), with_request=True)

    def record_usage(self, group, seconds, now=None, half_life_s=None):
        self._runner_write(self._record_usage, [self.prefix, group, repr(float(seconds)), repr(_now(now)),
                                                repr(half_life_s or FairPolicy().half_life_s), self._fence])

    def usage(self):
        names = sorted(raw.decode() for raw in self._redis.smembers(self._key("fusers")))
        pipe = self._redis.pipeline(transaction=True)
        for group in names:
            pipe.hmget(self._key("fuse", group), "seconds", "jobs", "at")
            pipe.scard(self._key("frun", group))
        replies = pipe.execute()
        usage = {}
        for index, group in enumerate(names):
            (seconds, jobs, at), count = replies[2 * index], replies[2 * index + 1]
            if seconds is None and not count:
                continue
            usage[group] = GroupUsage(float(seconds or 0), float(jobs or 0), float(at or 0), count)
        return usage

    def queued(self, kind):
        ids = [raw.decode() for raw in self._redis.zrange(self._key("queue", kind), 0, -1)]
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self._key("job", job_id), "grp", "created_at", "priority", "seq")
        rows = []
        for job_id, (group, created, priority, seq) in zip(ids, pipe.execute()):
            if group is not None:
                rows.append(Queued(job_id, group.decode(), float(created), int(priority), int(seq)))
        return rows

    def transition(self, job_id, expect, to, *, attempt=None, reason=None, error=None, cancel_requested=None,
                   refund_attempt=False, now=None, fenced=True):
        if to not in STATES:
            raise ValueError(f"unknown state {to!r}")
        now = _now(now)
        expires, backstop = self._expiry_args(now)
        cancel = "" if cancel_requested is None else str(int(cancel_requested))
        moved = self._runner_write(self._transition, [
            self.prefix, job_id, ",".join(expect), to, "" if attempt is None else str(attempt), repr(now), expires,
            backstop, reason or "", "0" if error is None else "1", error or "", cancel, "1" if refund_attempt else "0",
            self._fence if fenced else "", f"{CANCELLED_AT_REQUEUE}; {reason or 'requeued'}",
        ])
        return self.get(job_id) if moved else None

    def request_cancel(self, job_id, now=None):
        now = _now(now)
        expires, backstop = self._expiry_args(now)
        changed = self._cancel(args=[self.prefix, job_id, repr(now), expires, backstop, CANCEL_REASON])
        if changed == -1:
            return None
        job = self.get(job_id)
        return None if job is None else (job, bool(changed))

    def record_progress(self, job_id, attempt, progress):
        return bool(self._runner_write(self._progress, [self.prefix, job_id, str(attempt), dumps(progress), self._fence]))

    def save_result(self, job_id, attempt, result, files, now=None):
        now = _now(now)
        expires, backstop = self._expiry_args(now)
        pairs = []
        for meta, data in files:
            pairs += [meta.name, data]
        saved = self._runner_write(self._save_result, [
            self.prefix, job_id, str(attempt), repr(now), expires, backstop, dumps(result),
            dumps([meta.to_dict() for meta, _ in files]), self._fence, *pairs,
        ])
        return self.get(job_id) if saved else None

    def read_file(self, job_id, name):
        job = self.get(job_id)
        if job is None or job.state != SUCCEEDED or job.file(name) is None:
            return None
        return self._redis.get(self._key("file", job_id, name))

    def expire(self, now=None):
        total = 0
        while True:
            count = self._runner_write(self._expire, [self.prefix, repr(_now(now)), 500, self._fence])
            total += count
            if count < 500:
                return total

    # Targets and deliveries

    def put_target(self, job_id, target):
        outcome = self._put_target(args=[self.prefix, job_id, target["id"], dumps(target)])
        return None if outcome == -1 else bool(outcome)

    def delete_target(self, job_id, target_id):
        outcome = self._delete_target(args=[self.prefix, job_id, target_id])
        return None if outcome == -1 else bool(outcome)

    def _load_deliveries(self, ids: list) -> list[dict]:
        pipe = self._redis.pipeline(transaction=False)
        for did in ids:
            pipe.hgetall(self._key("dl", did.decode() if isinstance(did, bytes) else did))
        return [_delivery(fields) for fields in pipe.execute() if fields]

    def deliveries(self, job_id):
        return self._load_deliveries(self._redis.lrange(self._key("dls", job_id), 0, -1))

    def due_deliveries(self, now=None, limit=100):
        return self._load_deliveries(self._redis.zrangebyscore(self._key("due"), "-inf", repr(_now(now)),
                                                               start=0, num=limit))

    def record_delivery(self, delivery_id, attempt, outcome):
        def text(name):
            value = outcome.get(name)
            return "" if value is None else (repr(value) if isinstance(value, float) else str(value))

        recorded = self._runner_write(self._record_delivery, [
            self.prefix, delivery_id, str(attempt), outcome["state"], text("next_at"), text("last_status"),
            text("last_error"), text("delivered_at"), self._fence])
        if not recorded:
            return None
        return self._load_deliveries([delivery_id])[0]

    def add_quality(self, model, metric, increments):
        # One hash per (model, metric), listed in an index set; MULTI applies the increments at once.
        member = json.dumps([model, metric])
        pipe = self._redis.pipeline(transaction=True)
        pipe.sadd(self._key("quality"), member)
        for name, value in increments.items():
            pipe.hincrbyfloat(self._key("quality", member), name, float(value))
        pipe.execute()

    def quality_tallies(self):
        members = sorted(self._redis.smembers(self._key("quality")))
        pipe = self._redis.pipeline(transaction=False)
        for member in members:
            pipe.hgetall(self._key("quality", member.decode()))
        tallies = {}
        for member, fields in zip(members, pipe.execute()):
            model, metric = json.loads(member)
            tallies[(model, metric)] = {name.decode(): float(value) for name, value in fields.items()}
        return tallies

    def ping(self):
        self._redis.ping()

    def close(self):
        self._redis.close()


def _millis(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


def _float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _job(fields: dict, history: list, result: bytes | None, request: bytes | None) -> Job:
    text = {key.decode(): value.decode() for key, value in fields.items()}
    return Job(
        id=text["id"],
        kind=text["kind"],
        state=text["state"],
        request=None if request is None else json.loads(request),
        seq=int(text["seq"]),
        version=int(text["version"]),
        attempts=int(text["attempts"]),
        created_at=float(text["created_at"]),
        history=[json.loads(entry) for entry in history],
        idempotency_key=text.get("idempotency_key"),
        request_hash=text.get("request_hash"),
        cancel_requested=text.get("cancel_requested") == "1",
        started_at=_float(text.get("started_at")),
        finished_at=_float(text.get("finished_at")),
        expires_at=_float(text.get("expires_at")),
        progress=json.loads(text["progress"]) if "progress" in text else None,
        error=text.get("error"),
        result=None if result is None else json.loads(result),
        files=[ResultFile(**item) for item in json.loads(text.get("files", "[]"))],
        owner=text.get("owner"),
        targets=json.loads(text["targets"]) if "targets" in text else [],
        group=text.get("grp"),
        priority=PRIORITIES[int(text.get("priority", 1))],
    )


def _delivery(fields: dict) -> dict:
    text = {key.decode(): value.decode() for key, value in fields.items()}
    return {"id": text["id"], "job_id": text["job_id"], "owner": text.get("owner"), "target": json.loads(text["target"]),
            "event": text["event"], "state": text["state"], "attempts": int(text["attempts"]),
            "next_at": _float(text.get("next_at")), "created_at": float(text["created_at"]),
            "last_status": int(text["last_status"]) if "last_status" in text else None,
            "last_error": text.get("last_error"), "delivered_at": _float(text.get("delivered_at"))}
