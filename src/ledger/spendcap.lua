#!lua name=spendcap
--[[
spendcap ledger — Redis Functions library `spendcap`.

Every ledger operation is exactly one FCALL of one function below. A function touches only the
keys of one budget tree, all of which share the tree's hash tag, so the library runs unchanged on
Redis Cluster. KEYS[1] is always the tree's key prefix, `<ns>:{<tree>}`; every other key is built
from it:

  <P>:a:<agent>        hash   agent: handle parent path depth cap spent held revoked revoked_at
                              expires_at created_at token labels; optionally ctl (controls
                              JSON) alerts (`50,80,100`) alerted (`<percent>:<cap>`, the cap's
                              highest alert sent) task_of suspended suspended_at, and the
                              breaker's rsig rcount (last service + amount, streak) ssum;
                              archived (when spendcap_archive archived it)
  <P>:agents           set    agent ids of the tree
  <P>:h:<hold>         hash   hold: agent amount state expires_at created_at ended_at settled
                              task service protocol idem details buckets ctrs; once settled also
                              seq sdetails (settle details) and, once signed, receipt rhash;
                              an `unknown` hold also unknown_at unknown_reason
  <P>:holds            zset   open holds by expiry (ms)
  <P>:unknown          zset   holds whose outcome is unknown (state `unknown`), by the time
                              they were marked: they never expire; settle or void ends them
  <P>:log              stream one entry per state change: ts ev agent task svc proto amt rel
                              hold reason cap parent remaining limited_by bk ctr cross detail
                              tt (a task outcome's task type) by (who made the change: an
                              operator's name or `admin` on the admin side, `agent:<id>` for
                              an agent managing itself or its sub-agents; empty for payments);
                              consumer group `alerts` (the daemon's webhooks)
  <P>:i:<agent>:<key>  hash   idempotency record: fp status hold code amount remaining expires_at
  <P>:receipts         list   settled hold ids in receipt order: receipt <seq> is element seq-1
  <P>:b:<bucket>       hash   budget bucket: agent cap spent held open exclusive label
  <P>:hseq             string sequence for hold ids the library assigns (hold_id '')
  <P>:rhead            hash   receipt chain head: seq hash
  <P>:p:<agent>:<period>:<start_ms>  hash  period counter: spent held alerted
  <P>:pi:<agent>       zset   the agent's period counters `<period>:<start_ms>`, by start
  <P>:t:<agent>:<hex of task>        hash  per-task counter: task spent held alerted
  <P>:vh:<agent>       list   breaker: times of the agent's latest holds, newest first
  <P>:vs:<agent>       list   breaker: `<ms>:<amount>` of its holds within the spend window
  <P>:sub:<agent>      set    the sub-agents the agent created itself (spendcap_create_sub_agent)
  <P>:tt:<id>          hash   task token: agent hash task expires_at created_at by (agent id, '' for
                              the admin), once revoked revoked; kept a week past its expiry
  <P>:tts:<agent>      set    the agent's task token ids
  <P>:approvals        zset   holds that waited for approval, by the time they were made (a week)
  <P>:seen:<agent>     set    services the agent settled with under a `new service` approval rule

Approval holds. `ctl.appr` = { above, new, svc, proto, ttl_ms }: a payment above `above`, over
a listed protocol, to a listed service (or payee), or (`new`) to a service not in the agent's
`seen` set is held as usual (every cap and limit, counted as held) but in state
`pending_approval` with expires_at = now + ttl_ms (the shortest of the matching levels'), hold
fields appr (reason) appr_state (pending approved denied expired canceled) appr_exp life (its own
lifetime from the approval on) and, once decided, appr_by appr_note appr_at; its `hold` log entry
carries appr and aexp. The hold replies `approval`, and its idempotency record has status
`approval`: a repeat of the request gets the approval's state, or, once approved, the hold
(`ok`, replayed, approved 1) exactly once, the record becoming `in_flight` (pending mode) or
`granted`. spendcap_approval_decide opens (approve) or voids (deny, reason approval_denied) it;
expiry releases it like any open hold (reason approval_expired). A pending hold cannot be
settled (hold_pending_approval); it can be voided (canceled). `nsvc` on a hold: a settle adds
its service to the agent's `seen` set.

Operator tokens live outside every tree, under one fixed hash tag: KEYS[1] is `<ns>:{ops}` (O):
  <O>:o:<id>           hash   operator: name role tree token created_at created_by revoked_at
  <O>:names            hash   name -> id (names stay taken after a revocation)
  <O>:log              stream one entry per operator change: ts ev (operator_create |
                              operator_revoke) operator role tree by

Spending controls. `ctl` is a JSON object, every key optional (money in micro-USD, windows in
ms): task (per-task cap), per_payment daily weekly monthly all_time (limits; each not above the
next), svc_allow svc_deny (lowercase names; `*.example.com` matches subdomains), proto_allow
proto_deny (x402 acp ap2 generic api mpp), max_holds + window_ms, max_spend + spend_window_ms (needs
max_holds; spend window <= window), max_repeats. An agent without `ctl` and `alerts` takes the
plain path: no JSON is decoded and no counter is touched. Controls of an ancestor apply to its
whole subtree; the breaker watches only the agent's own holds. Periods are UTC calendar periods
(days from the epoch; ISO weeks from Monday; months by a civil-from-days conversion); a hold
charges the counter of the period it was made in, and only while that period's limit is
configured. A per-task counter is per (agent, task label); a sub-agent created with `task_of`
charges its ancestors' per-task counters for that task instead of its own label. Service lists
match the hold's service and the details fields pay_to, merchant_id, payee, payee_id,
case-insensitively. A hold records the counters it charged (`ctrs`, and `ctr` on its log
entry), and settle, void and expiry move exactly those. The breaker: one hold more than
max_holds within window_ms (exact: the list keeps the last max_holds times), more than max_spend
held within spend_window_ms, or more than max_repeats identical (service + amount) holds in a row
suspends the agent (`suspend` entry, reason velocity or repeat) and refuses that hold with
`agent_suspended`; spendcap_reinstate lifts it. Alerts: a hold that takes an agent's cap, period
limit or task cap from below to at least one of its `alerts` percents (not alerted yet for that
limit) lists the crossing in its log entry's `cross` field (a JSON array); the daemon turns it
into a webhook.

Money is integer micro-USD, at most 10^15 per amount and cap, so every sum stays exact in Lua's
doubles; numbers stored as text are formatted with string.format('%d'), and numbers passed to
commands are integers below 2^53, which Redis converts exactly.

Replies are flat arrays of strings: { status, key1, value1, key2, value2, ... } where status is
`ok`, `refused` (a budget decision, logged) or `error` (bad request, nothing changed).

Times are milliseconds since the Unix epoch, read from Redis's own clock (TIME) inside every
function, so that instances whose clocks differ cannot release a hold early or grant to an expired
agent. Functions still take a `now_ms` argument (ARGV[1] for most; optional for revoke and
reinstate), which is ignored, except in a library loaded in test mode (see `clock`). Absolute
times the caller passes (a hold's expires_at, an agent's expiry) are compared with Redis's clock.

Expiry needs no background process: every function that touches a tree first releases up to
EXPIRE_BATCH holds of that tree whose expiry has passed (and up to EXPIRE_MAX before it refuses a
hold for lack of budget), each with its own `expire` log entry.
--]]

local MAX_DEPTH = 8            -- an agent and at most 7 ancestors
local MAX_MICROS = 1000000000000000
local EXPIRE_BATCH = 32
local EXPIRE_MAX = 1024
local ENDED_HOLD_RETENTION_MS = 7 * 24 * 3600 * 1000

local function fmt(n)
  return string.format('%d', n)
end

-- The ledger's one clock: Redis's own (TIME), so that every instance, whatever its host's clock
-- says, agrees on hold and agent expiry, period boundaries, breaker windows and idempotency
-- leases. The `now_ms` argument the functions still take (the interface is stable) is ignored,
-- except in a library the test harness loads with TEST_CLOCK set (RedisConfig's
-- `LedgerClock::Caller`, which no flag or variable of the binary can select), where it lets tests
-- move time without sleeping.
local TEST_CLOCK = false

local function clock(caller_now)
  if TEST_CLOCK then
    local n = tonumber(caller_now or '')
    if n then return n end
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function reply(status, fields)
  table.insert(fields, 1, status)
  return fields
end

local function err(code, detail)
  return { 'error', 'code', code, 'detail', detail or '' }
end

-- Shared by every empty split: callers only read what split_path returns.
local NO_IDS = {}

local function split_path(path)
  if path == '' then return NO_IDS end
  if not string.find(path, ',', 1, true) then return { path } end
  local ids = {}
  for id in string.gmatch(path, '[^,]+') do ids[#ids + 1] = id end
  return ids
end

-- Appends one entry to the tree's log. Fields whose value is empty are left out: readers take a
-- missing field as empty, and the stream keeps less. `fields` is compacted in place.
local function log(P, fields)
  local n = 0
  for i = 1, #fields, 2 do
    local v = fields[i + 1]
    if v ~= '' then
      fields[n + 1], fields[n + 2] = fields[i], v
      n = n + 2
    end
  end
  redis.call('XADD', P .. ':log', '*', unpack(fields, 1, n))
end

local function parse_money(text, name)
  local n = tonumber(text)
  if n == nil or n < 0 or n > MAX_MICROS or n ~= math.floor(n) then
    return nil, err('invalid_argument', name .. ' must be an integer from 0 to ' .. fmt(MAX_MICROS))
  end
  return n
end

-- Reads a hold into a table (its fields by name; absent ones empty), or nil. One HGETALL: a
-- hold's small hash is a listpack, which HMGET would scan once per field.
local function read_hold(P, hold_id)
  local v = redis.call('HGETALL', P .. ':h:' .. hold_id)
  if #v == 0 then return nil end
  local h = { settled = '0', seq = '', task = '', service = '', protocol = '', buckets = '',
              details = '', sdetails = '', ended_at = '', ctrs = '' }
  for i = 1, #v, 2 do h[v[i]] = v[i + 1] end
  h.amount_s = h.amount
  h.amount, h.expires_at, h.settled = tonumber(h.amount), tonumber(h.expires_at), tonumber(h.settled)
  return h
end

-- Ends the open hold `h` (as read by read_hold) as `settled` (with `settled` micros spent, and
-- receipt sequence number `seq`, as text), `voided` or `expired`: moves its money off `held` (and
-- `settled` of it onto `spent`) on the agent, every ancestor and every bucket it charged, and
-- appends the hold's one closing log entry. `path` is the agent's path, or nil to read it.
-- `own`, if given, is the agent's own `held` and `spent` as the caller read them in this call
-- with nothing changed since: the agent's level is then written with one HSET. `now_s` is the
-- time as text (fmt). `by`, if given, names who ended it (an admin's resolution, an approval's
-- denial) on the log entry. Returns the settled and released amounts as text.
-- Settled holds are kept (they carry the receipt); voided and expired ones expire after a week.
local function end_hold(P, hold_id, h, path, state, settled, now_s, reason, details, seq, own, by)
  local amount = h.amount
  local settled_s, released_s = fmt(settled), fmt(amount - settled)
  path = path or redis.call('HGET', P .. ':a:' .. h.agent, 'path')
  for i, id in ipairs(split_path(path)) do
    local akey = P .. ':a:' .. id
    if i == 1 and own then
      redis.call('HSET', akey, 'held', fmt(own[1] - amount), 'spent', fmt(own[2] + settled))
    else
      redis.call('HINCRBY', akey, 'held', -amount)
      if settled > 0 then redis.call('HINCRBY', akey, 'spent', settled) end
    end
  end
  for _, id in ipairs(split_path(h.buckets)) do
    local bkey = P .. ':b:' .. id
    redis.call('HINCRBY', bkey, 'held', -amount)
    redis.call('HINCRBY', bkey, 'open', -1)
    if settled > 0 then redis.call('HINCRBY', bkey, 'spent', settled) end
  end
  for _, id in ipairs(split_path(h.ctrs)) do
    local ckey = P .. ':' .. id
    redis.call('HINCRBY', ckey, 'held', -amount)
    if settled > 0 then redis.call('HINCRBY', ckey, 'spent', settled) end
  end
  local hkey = P .. ':h:' .. hold_id
  if state == 'settled' then
    redis.call('HSET', hkey, 'state', state, 'ended_at', now_s, 'settled', settled_s,
               'seq', seq, 'sdetails', details)
    -- Under a `new service` approval rule, the agent has now settled with this service.
    if h.nsvc == '1' then redis.call('SADD', P .. ':seen:' .. h.agent, string.lower(h.service)) end
  else
    redis.call('HSET', hkey, 'state', state, 'ended_at', now_s)
    redis.call('PEXPIRE', hkey, ENDED_HOLD_RETENTION_MS)
  end
  redis.call('ZREM', P .. ':holds', hold_id)
  if h.state == 'unknown' then redis.call('ZREM', P .. ':unknown', hold_id) end
  if h.state == 'pending_approval' then
    local outcome = 'canceled'
    if reason == 'approval_denied' then outcome = 'denied' end
    if state == 'expired' then outcome, reason = 'expired', 'approval_expired' end
    redis.call('HSET', hkey, 'appr_state', outcome)
  end
  local event, amt_s = 'settle', settled_s
  if state == 'voided' then event, amt_s = 'void', released_s end
  if state == 'expired' then event, amt_s = 'expire', released_s end
  log(P, { 'ts', now_s, 'ev', event, 'agent', h.agent, 'task', h.task, 'svc', h.service,
           'proto', h.protocol, 'amt', amt_s, 'rel', released_s, 'hold', hold_id,
           'reason', reason, 'detail', details, 'by', by or '' })
  return settled_s, released_s
end

-- The expiry batch sizes as text, for ZRANGEBYSCORE (string.format is not available while the
-- library loads).
local LIMIT_TEXT = { [EXPIRE_BATCH] = '32', [EXPIRE_MAX] = '1024' }

-- Releases holds of the tree whose expiry is at or before `now_s` (the time as text, fmt), at
-- most `limit` of them. Returns how many it released and whether more are due.
local function expire_due(P, now_s, limit)
  local due = redis.call('ZRANGEBYSCORE', P .. ':holds', '-inf', now_s, 'LIMIT', '0',
                          LIMIT_TEXT[limit] or fmt(limit))
  for _, hold_id in ipairs(due) do
    local h = read_hold(P, hold_id)
    if h and (h.state == 'open' or h.state == 'pending_approval') then
      end_hold(P, hold_id, h, nil, 'expired', 0, now_s, 'hold_expired', '')
    else
      redis.call('ZREM', P .. ':holds', hold_id)
    end
  end
  return #due, #due == limit
end

-- The agent fields every hold reads on each level of the path (one HMGET per level).
local LEVEL_FIELDS = { 'cap', 'spent', 'held', 'revoked', 'expires_at', 'suspended', 'ctl', 'alerts',
                       'alerted', 'task_of' }

-- A level from LEVEL_FIELDS values read into `v` from index `o + 1` on.
local function level(id, v, o)
  return { id = id, cap = tonumber(v[o + 1]), spent = tonumber(v[o + 2]), held = tonumber(v[o + 3]),
           revoked = v[o + 4], expires_at = v[o + 5], suspended = v[o + 6], ctl = v[o + 7],
           alerts = v[o + 8], alerted = v[o + 9], task_of = v[o + 10] }
end

-- Reads the agent and its ancestors (bounded by MAX_DEPTH at creation). `first`, if given, holds
-- the agent's own LEVEL_FIELDS, already read, from index `first_at + 1` on.
local function read_path(P, path, first, first_at)
  local levels = {}
  for i, id in ipairs(split_path(path)) do
    if i == 1 and first then
      levels[1] = level(id, first, first_at)
    else
      levels[i] = level(id, redis.call('HMGET', P .. ':a:' .. id, unpack(LEVEL_FIELDS)), 0)
    end
  end
  return levels
end

-- The most the agent can still hold: the smallest headroom over itself and its ancestors.
local function available(levels)
  local best, by = nil, ''
  for _, l in ipairs(levels) do
    local room = l.cap - l.spent - l.held
    if room < 0 then room = 0 end
    if best == nil or room < best then best, by = room, l.id end
  end
  return best or 0, by
end

-- Authenticates a caller: `token` is the SHA-256 (hex) of the agent's bearer token, or `*` for a
-- caller the daemon has already authenticated as admin. Comparing hashes of 256-bit random
-- tokens leaks nothing useful through timing.
-- Checks a caller's `token` against the agent's stored token hash `stored`. `token` is `*`
-- (admin), the SHA-256 of the agent's own token, or `t<id>:<sha256>` for a task-scoped token
-- (see spendcap_create_task_token): that token must be the agent's and, when `now` is given
-- (every call but the end of a hold the agent already has), neither revoked nor expired by the
-- ledger's clock. Returns nil (ok) and the task the token is for (or nil), or an error reply.
local function check_token(P, agent_id, stored, token, now)
  if token == '*' then return nil end
  if string.byte(token, 1) ~= 116 then -- not 't': an agent token's hash
    if stored ~= token then return err('unauthorized', 'token does not match') end
    return nil
  end
  local id, sha = string.match(token, '^t(%x+):(%x+)$')
  if not id then return err('unauthorized', 'token does not match') end
  local t = redis.call('HMGET', P .. ':tt:' .. id, 'agent', 'hash', 'task', 'expires_at', 'revoked')
  if t[1] ~= agent_id or t[2] ~= sha then return err('unauthorized', 'token does not match') end
  if now then
    if t[5] and t[5] ~= '' then return err('token_revoked', 'this task token was revoked') end
    if tonumber(t[4]) <= now then return err('token_expired', 'this task token has expired') end
  end
  return nil, t[3]
end

local function auth(P, agent_id, token, now)
  local a = redis.call('HMGET', P .. ':a:' .. agent_id, 'token', 'path')
  if not a[1] then return nil, err('unknown_agent', 'no agent ' .. agent_id) end
  local e, task = check_token(P, agent_id, a[1], token, now)
  if e then return nil, e end
  return a[2], nil, task
end

-- auth for a call that ends one of the agent's holds: also returns the agent's own `held` and
-- `spent` (end_hold's `own`: { held, spent }), read in the same HMGET.
local function auth_ending(P, agent_id, token)
  local a = redis.call('HMGET', P .. ':a:' .. agent_id, 'token', 'path', 'held', 'spent')
  if not a[1] then return nil, err('unknown_agent', 'no agent ' .. agent_id) end
  local e = check_token(P, agent_id, a[1], token, nil)
  if e then return nil, e end
  local path = a[2]
  a[1], a[2] = tonumber(a[3] or '0'), tonumber(a[4] or '0')
  return path, nil, a
end

-- ---------------------------------------------------------------------------------------------
-- Spending controls (see the header): validation, UTC calendar periods, allow/deny lists,
-- threshold crossings. None of this runs for an agent without `ctl` and `alerts` fields.

local DAY_MS = 86400000
local COUNTED_PERIODS = { 'daily', 'weekly', 'monthly', 'all_time' }
local NESTED_LIMITS = { 'per_payment', 'daily', 'weekly', 'monthly', 'all_time' }
local PROTOCOLS = { x402 = true, acp = true, ap2 = true, generic = true, api = true, mpp = true }
local PAYEE_DETAILS = { 'pay_to', 'merchant_id', 'payee', 'payee_id' }
local MAX_BREAKER_HOLDS = 10000
local MAX_REPEATS = 1000000
local MAX_WINDOW_MS = 31 * DAY_MS
local MAX_LIST = 256
local MAX_THRESHOLDS = 10

local CTL_MONEY = { task = true, per_payment = true, daily = true, weekly = true, monthly = true,
                    all_time = true, max_spend = true }
local CTL_LISTS = { svc_allow = true, svc_deny = true, proto_allow = true, proto_deny = true }
local CTL_COUNTS = { max_holds = MAX_BREAKER_HOLDS, max_repeats = MAX_REPEATS,
                     window_ms = MAX_WINDOW_MS, spend_window_ms = MAX_WINDOW_MS }

local function is_int(n, lo, hi)
  return type(n) == 'number' and n == math.floor(n) and n >= lo and n <= hi
end

-- Checks an approval rule (`ctl.appr`): above (micros), new (bool), svc and proto (lists),
-- ttl_ms (1 s to 7 days).
local MAX_APPROVAL_TTL_MS = 7 * DAY_MS
local function check_appr(a)
  if type(a) ~= 'table' then return nil, err('invalid_argument', 'appr must be an object') end
  for k, v in pairs(a) do
    if k == 'above' then
      if not is_int(v, 0, MAX_MICROS) then return nil, err('invalid_argument', 'appr.above must be micros') end
    elseif k == 'new' then
      if type(v) ~= 'boolean' then return nil, err('invalid_argument', 'appr.new must be a boolean') end
    elseif k == 'ttl_ms' then
      if not is_int(v, 1000, MAX_APPROVAL_TTL_MS) then
        return nil, err('invalid_argument', 'appr.ttl_ms must be from 1000 to ' .. fmt(MAX_APPROVAL_TTL_MS))
      end
    elseif k == 'svc' or k == 'proto' then
      if type(v) ~= 'table' or #v > MAX_LIST then
        return nil, err('invalid_argument', 'appr.' .. k .. ' must be a list of at most ' .. MAX_LIST .. ' names')
      end
      for _, name in ipairs(v) do
        if type(name) ~= 'string' or #name < 1 or #name > 256 or name ~= string.lower(name) then
          return nil, err('invalid_argument', 'appr.' .. k .. ' entries are lowercase strings of 1 to 256 bytes')
        end
        if k == 'proto' and not PROTOCOLS[name] then
          return nil, err('invalid_argument', 'unknown protocol ' .. name)
        end
      end
    else
      return nil, err('invalid_argument', 'unknown approval rule ' .. tostring(k))
    end
  end
  if not a.ttl_ms then return nil, err('invalid_argument', 'appr.ttl_ms is required') end
  return true
end

-- Decodes and checks a `ctl` JSON object; returns the table, or nil and an error reply.
local function parse_ctl(text)
  local ok, c = pcall(cjson.decode, text)
  if not ok or type(c) ~= 'table' then return nil, err('invalid_argument', 'controls must be a JSON object') end
  for k, v in pairs(c) do
    if CTL_MONEY[k] then
      if not is_int(v, 0, MAX_MICROS) then
        return nil, err('invalid_argument', k .. ' must be an integer from 0 to ' .. fmt(MAX_MICROS))
      end
    elseif CTL_COUNTS[k] then
      if not is_int(v, 1, CTL_COUNTS[k]) then
        return nil, err('invalid_argument', k .. ' must be an integer from 1 to ' .. fmt(CTL_COUNTS[k]))
      end
    elseif k == 'appr' then
      local ok2, e2 = check_appr(v)
      if not ok2 then return nil, e2 end
    elseif CTL_LISTS[k] then
      if type(v) ~= 'table' or #v > MAX_LIST then
        return nil, err('invalid_argument', k .. ' must be a list of at most ' .. MAX_LIST .. ' names')
      end
      for _, name in ipairs(v) do
        if type(name) ~= 'string' or #name < 1 or #name > 256 or name ~= string.lower(name) then
          return nil, err('invalid_argument', k .. ' entries are lowercase strings of 1 to 256 bytes')
        end
        if (k == 'proto_allow' or k == 'proto_deny') and not PROTOCOLS[name] then
          return nil, err('invalid_argument', 'unknown protocol ' .. name)
        end
      end
    else
      return nil, err('invalid_argument', 'unknown control ' .. tostring(k))
    end
  end
  if (c.max_holds == nil) ~= (c.window_ms == nil) then
    return nil, err('invalid_argument', 'max_holds and window_ms go together')
  end
  if (c.max_spend == nil) ~= (c.spend_window_ms == nil) then
    return nil, err('invalid_argument', 'max_spend and spend_window_ms go together')
  end
  if c.max_spend and (not c.max_holds or c.spend_window_ms > c.window_ms) then
    return nil, err('invalid_argument', 'the spend window must not be longer than the hold window')
  end
  local last, last_name = nil, nil
  for _, name in ipairs(NESTED_LIMITS) do
    if c[name] then
      if last and c[name] < last then
        return nil, err('invalid_argument', last_name .. ' limit is above the ' .. name .. ' limit')
      end
      last, last_name = c[name], name
    end
  end
  return c
end

-- Parses an `alerts` field: ascending percents from 1 to 100, comma-separated.
local function parse_alerts(text)
  local out = {}
  for p in string.gmatch(text, '[^,]+') do
    local n = tonumber(p)
    if not is_int(n, 1, 100) or (#out > 0 and n <= out[#out]) or #out >= MAX_THRESHOLDS then
      return nil, err('invalid_argument', 'alerts are up to ' .. MAX_THRESHOLDS
                      .. ' ascending percents from 1 to 100, comma-separated')
    end
    out[#out + 1] = n
  end
  return out
end

-- Civil date from days since 1970-01-01 (Howard Hinnant's algorithm), and back.
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

-- The start (ms) of the UTC calendar period of `kind` that contains `now`: days start at
-- midnight UTC, weeks on Monday (ISO), months on the 1st; all_time starts at 0.
local function period_start(kind, now)
  if kind == 'all_time' then return 0 end
  local day = math.floor(now / DAY_MS)
  if kind == 'daily' then return day * DAY_MS end
  if kind == 'weekly' then return (day - (day + 3) % 7) * DAY_MS end
  local y, m = civil_from_days(day)
  return days_from_civil(y, m) * DAY_MS
end

-- Whether any name in `ids` is on `list` (`*.example.com` matches every subdomain).
local function listed(list, ids)
  for _, entry in ipairs(list) do
    local suffix = string.sub(entry, 1, 2) == '*.' and string.sub(entry, 2) or nil
    for _, id in ipairs(ids) do
      if id == entry then return true end
      if suffix and #id > #suffix and string.sub(id, -#suffix) == suffix then return true end
    end
  end
  return false
end

-- The names a payment goes by: its service and the payee fields of its details, lowercased.
local function payment_names(service, details)
  local ids = { string.lower(service) }
  if details ~= '' then
    local ok, d = pcall(cjson.decode, details)
    if ok and type(d) == 'table' then
      for _, k in ipairs(PAYEE_DETAILS) do
        if type(d[k]) == 'string' and d[k] ~= '' then ids[#ids + 1] = string.lower(d[k]) end
      end
    end
  end
  return ids
end

-- Why a payment needs approval under the rule `a` (ctl.appr), or nil; the order is the Rust
-- `ApprovalRule::reason`'s. `seen()` tells whether the agent settled with the service before.
local function approval_reason(a, amount, protocol, service, details, seen)
  if a.above and amount > a.above then return 'above_amount' end
  if a.proto and #a.proto > 0 and listed(a.proto, { protocol }) then return 'listed_protocol' end
  if a.svc and #a.svc > 0 and listed(a.svc, payment_names(service, details)) then return 'listed_service' end
  if a.new and not seen() then return 'new_service' end
  return nil
end

-- A task label as lowercase hex, for the per-task counter's key.
local function to_hex(text)
  return (string.gsub(text, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

-- The smallest amount that is at least `percent`% of `limit`, exactly (no product above 2^53).
local function threshold(limit, percent)
  return math.floor(limit / 100) * percent + math.ceil((limit % 100) * percent / 100)
end

-- Appends the thresholds of `percents` that usage crossing from `before` to `after` passes, as
-- JSON objects, to `out`, unless already alerted for this limit (`alerted` = "<percent>:<limit>").
-- Returns the new `alerted` value, or nil if nothing crossed.
local function crossings(out, percents, limit, before, after, alerted, head)
  local done = 0
  local p, l = string.match(alerted or '', '^(%d+):(%d+)$')
  if p and tonumber(l) == limit then done = tonumber(p) end
  local fired = nil
  for _, percent in ipairs(percents) do
    if percent > done then
      local t = threshold(limit, percent)
      if before < t and t <= after then
        fired = percent
        out[#out + 1] = head .. ',"percent":' .. fmt(percent) .. ',"limit_micros":' .. fmt(limit)
                        .. ',"used_micros":' .. fmt(after) .. '}'
      end
    end
  end
  if fired then return fmt(fired) .. ':' .. fmt(limit) end
  return nil
end

-- The checks of a payment that need no amount, on the agent and every ancestor (`levels` from
-- read_path), in spendcap_hold's order: revoked, suspended, expired, then the protocol and
-- service lists. Decodes each level's controls into `l.c`. Returns a refusal code and who
-- refused (or nil and ''), and whether any level has controls.
-- The first checks of `gate`: revoked, suspended, expired, anywhere on the path (nearest first
-- within each). Returns a refusal code and who refused, or nil.
local function standing_refusal(levels, now)
  for _, l in ipairs(levels) do
    if l.revoked and l.revoked ~= '' then return 'agent_revoked', l.id end
  end
  for _, l in ipairs(levels) do
    if l.suspended and l.suspended ~= '' then return 'agent_suspended', l.id end
  end
  for _, l in ipairs(levels) do
    if l.expires_at and l.expires_at ~= '' and tonumber(l.expires_at) <= now then
      return 'agent_expired', l.id
    end
  end
  return nil, ''
end

local function gate(levels, now, protocol, service, details)
  local standing, standing_by = standing_refusal(levels, now)
  if standing then return standing, standing_by, false end
  local controlled = false
  for _, l in ipairs(levels) do
    if l.ctl and l.ctl ~= '' then
      l.c = cjson.decode(l.ctl)
      controlled = true
    end
  end
  if not controlled then return nil, '', false end
  local names = nil
  for _, l in ipairs(levels) do
    local c = l.c
    if c then
      if (c.proto_deny and listed(c.proto_deny, { protocol }))
         or (c.proto_allow and #c.proto_allow > 0 and not listed(c.proto_allow, { protocol })) then
        return 'protocol_denied', l.id, true
      end
      if (c.svc_deny and #c.svc_deny > 0) or (c.svc_allow and #c.svc_allow > 0) then
        names = names or payment_names(service, details)
        if (c.svc_deny and listed(c.svc_deny, names))
           or (c.svc_allow and #c.svc_allow > 0 and not listed(c.svc_allow, names)) then
          return 'service_denied', l.id, true
        end
      end
    end
  end
  return nil, '', true
end

local function idem_reply(rec, replayed)
  if rec[2] == 'done' then return { 'done', 'response', rec[9] or '', 'replayed', replayed } end
  local fields = { 'hold', rec[3] or '', 'code', rec[4] or '', 'amount', rec[5] or '',
                   'remaining', rec[6] or '', 'expires_at', rec[7] or '', 'limited_by', rec[8] or '',
                   'replayed', replayed }
  if rec[2] == 'granted' then return reply('ok', fields) end
  return reply('refused', fields)
end

-- The answer about a payment waiting for approval (`approval` reply): its hold, amount, the
-- approval's expiry, the reason, its state (pending, denied, expired, canceled) and the decision.
local function approval_answer(hold_id, h, state, replayed)
  return { 'approval', 'hold', hold_id, 'amount', h and h.amount_s or '0',
           'expires_at', h and (h.appr_exp or '') or '', 'reason', h and (h.appr or '') or '',
           'state', state, 'by', h and (h.appr_by or '') or '', 'note', h and (h.appr_note or '') or '',
           'replayed', replayed }
end

-- Ends a pending approval whose time ran out (one `expire` log entry, reason approval_expired).
local function lapse_approval(P, hold_id, h, now)
  if h and h.state == 'pending_approval' and h.expires_at <= now then
    end_hold(P, hold_id, h, nil, 'expired', 0, fmt(now), 'hold_expired', '')
    h.state, h.appr_state = 'expired', 'expired'
  end
end

-- A repeated request whose first one waits (or waited) for approval: still pending, denied or
-- expired → the approval's state; approved → the held reservation, exactly once: the record
-- becomes the hold's ordinary record (`in_flight` with a lease for a `pending` operation, so a
-- concurrent resume gets idempotency_in_flight; `granted` for a `final` one).
local function approval_replay(P, ikey, rec, now, args)
  local hold_id = rec[3]
  local h = read_hold(P, hold_id)
  lapse_approval(P, hold_id, h, now)
  local state = (h and h.appr_state) or 'expired'
  if state ~= 'approved' then return approval_answer(hold_id, h, state, '1') end
  local status = 'granted'
  if args[14] == 'pending' then status = 'in_flight' end
  local exp_s = fmt(h.expires_at)
  redis.call('HSET', ikey, 'status', status, 'expires_at', exp_s, 'replayed', '1',
             'lease_until', fmt(now + tonumber(args[15] or '0')))
  return { 'ok', 'hold', hold_id, 'code', '', 'amount', h.amount_s, 'remaining', rec[6] or '0',
           'expires_at', exp_s, 'limited_by', '', 'replayed', '1', 'approved', '1' }
end

--[[ spendcap_hold
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 token_sha256|*  4 amount  5 new hold_id ('' to have one assigned:
        hd_<tree>_<24-digit sequence>, for scripts and redis-benchmark)  6 hold expiry: `<ms>` an
        absolute time, or `+<ms>` a lifetime from the ledger's clock
        7 task  8 service  9 protocol  10 idempotency key ('' for none)  11 request fingerprint
        12 details JSON ('' for none)  13 idempotency retention ms  14 idempotency mode:
        `final` (the hold is the whole operation) or `pending` (the caller finishes it later with
        spendcap_idem_finish; duplicates meanwhile get `idempotency_in_flight`)
        15 in-flight lease ms (pending mode): a duplicate arriving after the lease ran out (the
        first caller died) takes the lease over and gets the hold back (replayed), so it can
        finish the same purchase with the same hold
        16 budget buckets (comma-separated bucket ids, '' for none): extra budgets this hold is
        also charged against (an AP2 open mandate's budget, say); each must belong to the agent
        or an ancestor
        17 (optional) `1`: also answer the tree's receipt chain head (for a new hold)
Reply   ok:      hold expires_at amount remaining replayed, and for a new hold asked with ARGV 17
                 head_seq head_hash (the tree's receipt chain head, for signing the receipt ahead)
        done:    response replayed (a finished `pending` operation, replayed)
        refused: code (agent_revoked | agent_suspended | agent_expired | protocol_denied |
                 service_denied | cap_exceeded | per_payment_limit_exceeded |
                 daily_limit_exceeded | weekly_limit_exceeded | monthly_limit_exceeded |
                 all_time_limit_exceeded | task_cap_exceeded | budget_exceeded | budget_busy)
                 amount remaining limited_by
        approval: hold amount expires_at (the approval's) reason state (pending | approved |
                 denied | expired | canceled) by note replayed — the payment waits for (or was
                 refused) approval; see "Approval holds" above
        error:   code (unknown_agent | unauthorized | idempotency_conflict |
                 idempotency_in_flight | invalid_argument | hold_exists | unknown_bucket) detail
Checks, in this order, on the agent and every ancestor: revoked, suspended, expired, protocol
and service lists, the caps, then the tightest of the per-payment, period and per-task limits,
then the buckets; last the agent's own runaway-loop breaker, which suspends it (a `suspend`
entry) instead of granting a hold that would trip it. `remaining` is the tightest room left.
--]]
local function hold(keys, args)
  local P = keys[1]
  local now, agent_id, token = clock(args[1]), args[2], args[3]
  local amount, e = parse_money(args[4], 'amount')
  if not amount then return e end
  if amount == 0 then return err('invalid_argument', 'amount must be positive') end
  local hold_id, expires_at = args[5], tonumber(args[6])
  -- `+<ms>`: a lifetime, measured from the ledger's clock.
  if string.sub(args[6], 1, 1) == '+' then
    local life = tonumber(string.sub(args[6], 2))
    expires_at = life and now + life
  end
  local task, service, protocol = args[7], args[8], args[9]
  local idem, fp, details = args[10], args[11], args[12]
  local amount_s, now_s, expires_s = fmt(amount), fmt(now), expires_at and fmt(expires_at) or ''
  -- One read for authentication, the agent's own balance and its controls.
  local akey = P .. ':a:' .. agent_id
  local a = redis.call('HMGET', akey, 'token', 'path', 'rsig', 'rcount', unpack(LEVEL_FIELDS))
  if not a[1] then return err('unknown_agent', 'no agent ' .. agent_id) end
  local e_token, forced_task = check_token(P, agent_id, a[1], token, now)
  if e_token then return e_token end
  -- A task-scoped token's payments are that task's, whatever label the request names.
  if forced_task then task = forced_task end
  local path, rsig, rcount = a[2], a[3], a[4]
  if hold_id == '' then
    hold_id = 'hd_' .. string.match(P, '{(.-)}') .. '_'
              .. string.format('%024d', redis.call('INCR', P .. ':hseq'))
  end

  local ikey = nil
  if idem ~= '' then
    ikey = P .. ':i:' .. agent_id .. ':' .. idem
    local rec = redis.call('HMGET', ikey, 'fp', 'status', 'hold', 'code', 'amount', 'remaining',
                           'expires_at', 'limited_by', 'response', 'lease_until')
    if rec[1] then
      if rec[1] ~= fp then
        return err('idempotency_conflict', 'this idempotency key was used with a different request')
      end
      if rec[2] == 'approval' then return approval_replay(P, ikey, rec, now, args) end
      if rec[2] == 'in_flight' then
        if now < tonumber(rec[10] or '0') then
          return err('idempotency_in_flight', 'a request with this idempotency key is in progress')
        end
        redis.call('HSET', ikey, 'lease_until', fmt(now + tonumber(args[15] or '0')))
        rec[2] = 'granted'
      end
      -- A duplicate (its own new hold id) gets the answer; the daemon re-asking after a lost
      -- answer (the same hold id) does not count as the agent having it.
      if hold_id ~= rec[3] then redis.call('HSET', ikey, 'replayed', '1') end
      return idem_reply(rec, '1')
    end
  end

  local bucket_ids = split_path(args[16] or '')
  if #bucket_ids > 0 then
    local owners = {}
    for _, id in ipairs(split_path(path)) do owners[id] = true end
    for _, id in ipairs(bucket_ids) do
      local owner = redis.call('HGET', P .. ':b:' .. id, 'agent')
      if not owner or not owners[owner] then
        return err('unknown_bucket', 'no budget ' .. id .. ' for this agent')
      end
    end
  end

  -- The agent's own fields (a[5] on) stay valid unless expiry just released some of its money.
  local first = a
  if expire_due(P, now_s, EXPIRE_BATCH) > 0 then first = nil end

  -- Decides on the current balances: a refusal code and who refused, or nil. `charges` are the
  -- period and task counters a grant charges: { id, limit, used, alerted, level, head }.
  local levels, room, limited_by, charges
  local function decide()
    levels = read_path(P, path, first, 4)
    first = nil
    charges = {}
    local code, code_by, controlled = gate(levels, now, protocol, service, details)
    if code then return code, code_by end
    local by
    room, by = available(levels)
    if amount > room then return 'cap_exceeded', by end
    if controlled then
      -- The tightest of the per-payment, period and per-task limits of every level.
      local tight, tight_code, tight_by = nil, nil, nil
      local function consider(r, code, id)
        if tight == nil or r < tight then tight, tight_code, tight_by = r, code, id end
      end
      local level_task = task
      for _, l in ipairs(levels) do
        local c = l.c
        if c then
          if c.per_payment then consider(c.per_payment, 'per_payment_limit_exceeded', l.id) end
          for _, kind in ipairs(COUNTED_PERIODS) do
            if c[kind] then
              local start = period_start(kind, now)
              local id = 'p:' .. l.id .. ':' .. kind .. ':' .. fmt(start)
              local v = redis.call('HMGET', P .. ':' .. id, 'spent', 'held', 'alerted')
              local used = tonumber(v[1] or '0') + tonumber(v[2] or '0')
              consider(c[kind] - used, kind .. '_limit_exceeded', l.id)
              charges[#charges + 1] = { id = id, limit = c[kind], used = used, alerted = v[3],
                                        level = l, new = not v[1], kind = kind, start = start,
                                        head = '{"agent":' .. cjson.encode(l.id) .. ',"limit":"' .. kind
                                               .. '","period_start_ms":' .. fmt(start) }
            end
          end
          if c.task then
            local id = 't:' .. l.id .. ':' .. to_hex(level_task)
            local v = redis.call('HMGET', P .. ':' .. id, 'spent', 'held', 'alerted')
            local used = tonumber(v[1] or '0') + tonumber(v[2] or '0')
            consider(c.task - used, 'task_cap_exceeded', l.id)
            charges[#charges + 1] = { id = id, limit = c.task, used = used, alerted = v[3], level = l,
                                      new = not v[1], label = level_task,
                                      head = '{"agent":' .. cjson.encode(l.id) .. ',"limit":"task","task":'
                                             .. cjson.encode(level_task) }
          end
        end
        -- A sub-agent created for one of its parent's tasks spends that task's budget above it.
        if l.task_of and l.task_of ~= '' then level_task = l.task_of end
      end
      if tight ~= nil then
        if tight < 0 then tight = 0 end
        if amount > tight then
          room = tight
          return tight_code, tight_by
        end
        if tight < room then room = tight end
      end
    end
    for _, id in ipairs(bucket_ids) do
      local b = redis.call('HMGET', P .. ':b:' .. id, 'cap', 'spent', 'held', 'open', 'exclusive')
      local b_room = tonumber(b[1]) - tonumber(b[2]) - tonumber(b[3])
      if b[5] == '1' and tonumber(b[4]) > 0 then room = 0 return 'budget_busy', id end
      if amount > b_room then
        if b_room < 0 then b_room = 0 end
        room = b_room
        return 'budget_exceeded', id
      end
      if b_room < room then room = b_room end
    end
    return nil, ''
  end
  local refusal
  refusal, limited_by = decide()
  if refusal and (refusal == 'cap_exceeded' or string.match(refusal, '_exceeded$') or refusal == 'budget_busy') then
    -- Holds that expired but were beyond this call's first batch still count as held; release
    -- them all (bounded) before refusing, so that no refusal is ever caused by stale holds.
    local more = true
    local released = 0
    while more and released < EXPIRE_MAX do
      local n
      n, more = expire_due(P, now_s, EXPIRE_BATCH)
      released = released + n
    end
    if released > 0 then refusal, limited_by = decide() end
  end

  -- The runaway-loop breaker watches the agent's own holds: one more than `max_holds` in
  -- `window_ms`, more than `max_spend` held in `spend_window_ms`, or more than `max_repeats`
  -- identical (service + amount) holds in a row suspends the agent instead of holding.
  local me = levels[1].c
  local breaker = nil
  if not refusal and me and (me.max_holds or me.max_repeats) then
    breaker = { sig = service .. '\n' .. fmt(amount) }
    local trip, rule
    if me.max_holds then
      local nth = redis.call('LINDEX', P .. ':vh:' .. agent_id, me.max_holds - 1)
      if nth and tonumber(nth) > now - me.window_ms then
        trip, rule = 'velocity', '{"rule":"holds","max_holds":' .. fmt(me.max_holds) .. ',"window_ms":'
                                 .. fmt(me.window_ms) .. '}'
      end
    end
    if not trip and me.max_spend then
      local skey = P .. ':vs:' .. agent_id
      local sum = tonumber(redis.call('HGET', akey, 'ssum') or '0')
      for _ = 1, MAX_BREAKER_HOLDS + 1 do
        local oldest = redis.call('LINDEX', skey, -1)
        if not oldest then break end
        local ts, amt = string.match(oldest, '^(%d+):(%d+)$')
        if tonumber(ts) > now - me.spend_window_ms then break end
        redis.call('RPOP', skey)
        sum = sum - tonumber(amt)
      end
      breaker.sum = sum
      redis.call('HSET', akey, 'ssum', fmt(sum))
      if sum + amount > me.max_spend then
        trip, rule = 'velocity', '{"rule":"spend","max_spend":' .. fmt(me.max_spend) .. ',"spend_window_ms":'
                                 .. fmt(me.spend_window_ms) .. '}'
      end
    end
    breaker.count = 1
    if rsig == breaker.sig then breaker.count = tonumber(rcount or '0') + 1 end
    if not trip and me.max_repeats and breaker.count > me.max_repeats then
      trip, rule = 'repeat', '{"rule":"repeat","max_repeats":' .. fmt(me.max_repeats) .. '}'
    end
    if trip then
      redis.call('HSET', akey, 'suspended', trip, 'suspended_at', fmt(now))
      log(P, { 'ts', fmt(now), 'ev', 'suspend', 'agent', agent_id, 'task', task, 'svc', service,
               'proto', protocol, 'amt', fmt(amount), 'reason', trip, 'detail', rule })
      refusal, limited_by, room = 'agent_suspended', agent_id, 0
    end
  end

  -- Approval rules of the agent and every ancestor: a matching payment is held like any other
  -- (above), but waits `pending_approval` until a person decides or its time runs out.
  local appr_reason, appr_ttl, appr_new = nil, nil, false
  if not refusal then
    local seen = nil
    local function was_seen()
      if seen == nil then
        seen = redis.call('SISMEMBER', P .. ':seen:' .. agent_id, string.lower(service)) == 1
      end
      return seen
    end
    for _, l in ipairs(levels) do
      local ar = l.c and l.c.appr
      if type(ar) == 'table' then
        if ar.new then appr_new = true end
        local why = approval_reason(ar, amount, protocol, service, details, was_seen)
        if why then
          appr_reason = appr_reason or why
          if not appr_ttl or ar.ttl_ms < appr_ttl then appr_ttl = ar.ttl_ms end
        end
      end
    end
  end

  local status, fields
  if refusal then
    local remaining = room or 0
    if refusal == 'agent_revoked' or refusal == 'agent_expired' or refusal == 'agent_suspended'
       or refusal == 'protocol_denied' or refusal == 'service_denied' then
      remaining = 0
    end
    if remaining < 0 then remaining = 0 end
    log(P, { 'ts', fmt(now), 'ev', 'refuse', 'agent', agent_id, 'task', task, 'svc', service,
             'proto', protocol, 'amt', fmt(amount), 'reason', refusal, 'remaining', fmt(remaining),
             'limited_by', limited_by, 'detail', details })
    status = 'refused'
    fields = { 'hold', '', 'code', refusal, 'amount', fmt(amount), 'remaining', fmt(remaining),
               'expires_at', '', 'limited_by', limited_by }
  else
    local crossed = {}
    for _, l in ipairs(levels) do
      local lkey = P .. ':a:' .. l.id
      redis.call('HINCRBY', lkey, 'held', amount_s)
      if l.alerts and l.alerts ~= '' then
        local before = l.spent + l.held
        local head = '{"agent":' .. cjson.encode(l.id) .. ',"limit":"cap"'
        local mark = crossings(crossed, parse_alerts(l.alerts) or {}, l.cap, before, before + amount,
                               l.alerted, head)
        if mark then redis.call('HSET', lkey, 'alerted', mark) end
      end
    end
    local hkey = P .. ':h:' .. hold_id
    local counters = ''
    if #charges > 0 then
      local ids = {}
      for _, ch in ipairs(charges) do
        local ckey = P .. ':' .. ch.id
        redis.call('HINCRBY', ckey, 'held', amount)
        if ch.new then
          if ch.kind then
            redis.call('HSET', ckey, 'spent', '0')
            redis.call('ZADD', P .. ':pi:' .. ch.level.id, ch.start, ch.kind .. ':' .. fmt(ch.start))
          else
            redis.call('HSET', ckey, 'spent', '0', 'task', ch.label)
          end
        end
        if ch.level.alerts and ch.level.alerts ~= '' then
          local mark = crossings(crossed, parse_alerts(ch.level.alerts) or {}, ch.limit, ch.used,
                                 ch.used + amount, ch.alerted, ch.head)
          if mark then redis.call('HSET', ckey, 'alerted', mark) end
        end
        ids[#ids + 1] = ch.id
      end
      counters = table.concat(ids, ',')
      redis.call('HSET', hkey, 'ctrs', counters)
    end
    if breaker then
      if me.max_holds then
        local vkey = P .. ':vh:' .. agent_id
        redis.call('LPUSH', vkey, fmt(now))
        redis.call('LTRIM', vkey, 0, me.max_holds - 1)
      end
      if me.max_spend then
        redis.call('LPUSH', P .. ':vs:' .. agent_id, fmt(now) .. ':' .. fmt(amount))
        redis.call('HSET', akey, 'ssum', fmt(breaker.sum + amount))
      end
      redis.call('HSET', akey, 'rsig', breaker.sig, 'rcount', fmt(breaker.count))
    end
    local buckets = ''
    if #bucket_ids > 0 then
      for _, id in ipairs(bucket_ids) do
        redis.call('HINCRBY', P .. ':b:' .. id, 'held', amount)
        redis.call('HINCRBY', P .. ':b:' .. id, 'open', 1)
      end
      buckets = table.concat(bucket_ids, ',')
      redis.call('HSET', hkey, 'buckets', buckets)
    end
    if idem ~= '' then redis.call('HSET', hkey, 'idem', idem) end
    if appr_new then redis.call('HSET', hkey, 'nsvc', '1') end
    local hold_state = 'open'
    if appr_reason then
      -- Waits for approval until then; once approved it lives its own lifetime from then on.
      local life = (expires_at or now) - now
      if life < 1 then life = 1 end
      hold_state, expires_s = 'pending_approval', fmt(now + appr_ttl)
      redis.call('HSET', hkey, 'appr', appr_reason, 'appr_state', 'pending', 'appr_exp', expires_s,
                 'life', fmt(life))
      local akey2 = P .. ':approvals'
      redis.call('ZREMRANGEBYSCORE', akey2, '-inf', fmt(now - ENDED_HOLD_RETENTION_MS))
      redis.call('ZADD', akey2, now_s, hold_id)
    end
    redis.call('HSET', hkey, 'agent', agent_id, 'amount', amount_s, 'state', hold_state,
               'expires_at', expires_s, 'created_at', now_s, 'task', task,
               'service', service, 'protocol', protocol, 'details', details)
    redis.call('ZADD', P .. ':holds', expires_s, hold_id)
    local entry = { 'ts', now_s, 'ev', 'hold', 'agent', agent_id, 'task', task, 'svc', service,
                    'proto', protocol, 'amt', amount_s, 'hold', hold_id, 'bk', buckets,
                    'detail', details }
    if appr_reason then
      entry[#entry + 1], entry[#entry + 2] = 'appr', appr_reason
      entry[#entry + 1], entry[#entry + 2] = 'aexp', expires_s
    end
    if counters ~= '' then
      entry[#entry + 1] = 'ctr'
      entry[#entry + 1] = counters
    end
    if #crossed > 0 then
      entry[#entry + 1] = 'cross'
      entry[#entry + 1] = '[' .. table.concat(crossed, ',') .. ']'
    end
    log(P, entry)
    status = 'ok'
    fields = { 'hold', hold_id, 'code', '', 'amount', amount_s,
               'remaining', fmt(room - amount), 'expires_at', expires_s,
               'limited_by', '' }
    if appr_reason then status = 'approval' end
  end
  -- A refused `pending` operation had no effect anywhere, so it is not recorded: a retry (after
  -- a cap raise, say) decides afresh. A refused `final` hold is its own result (Stripe's rule).
  if ikey and not (refusal and args[14] == 'pending') then
    local record_status = 'granted'
    if refusal then record_status = 'refused' end
    if args[14] == 'pending' and not refusal then record_status = 'in_flight' end
    if appr_reason then record_status = 'approval' end
    redis.call('HSET', ikey, 'fp', fp, 'status', record_status,
               'lease_until', fmt(now + tonumber(args[15] or '0')), unpack(fields))
    redis.call('PEXPIRE', ikey, tonumber(args[13]))
  end
  if appr_reason then
    return { 'approval', 'hold', hold_id, 'amount', amount_s, 'expires_at', expires_s,
             'reason', appr_reason, 'state', 'pending', 'by', '', 'note', '', 'replayed', '0' }
  end
  fields[#fields + 1] = 'replayed'
  fields[#fields + 1] = '0'
  if status == 'ok' and args[17] == '1' then
    -- The receipt chain head, so that the daemon can sign this hold's receipt before its settle
    -- even for the first receipt of a tree it has not linked to yet (see spendcap_settle). Only
    -- when asked: a daemon that knows the head does not pay for the read.
    local head = redis.call('HMGET', P .. ':rhead', 'seq', 'hash')
    fields[#fields + 1] = 'head_seq'
    fields[#fields + 1] = head[1] or '0'
    fields[#fields + 1] = 'head_hash'
    fields[#fields + 1] = head[2] or ''
  end
  return reply(status, fields)
end

-- Ends the idempotency record `key` of `agent_id` in the same call as the step that ends its
-- hold (`done`: stores `response` for duplicates; `release`: a retry gets the hold back), so that
-- a purchase's last ledger step is one FCALL. Only a record that names `hold_id` is touched (a
-- record forgotten or reused meanwhile is left alone; a finished one keeps its first answer), and
-- `release` only ends an in-flight one.
-- Returns '1' if it was ended, else '0'.
local function finish_with(P, agent_id, key, hold_id, outcome, response)
  if (key or '') == '' then return '0' end
  local ikey = P .. ':i:' .. agent_id .. ':' .. key
  local rec = redis.call('HMGET', ikey, 'hold', 'status')
  if rec[1] ~= hold_id then return '0' end
  if outcome == 'done' and (rec[2] == 'in_flight' or rec[2] == 'granted') then
    redis.call('HSET', ikey, 'status', 'done', 'response', response or '')
  elseif outcome == 'release' and rec[2] == 'in_flight' then
    redis.call('HSET', ikey, 'status', 'granted')
  else
    return '0'
  end
  return '1'
end

--[[ spendcap_idem_finish
KEYS[1] tree prefix
ARGV    1 agent_id  2 idempotency key  3 outcome: `done`, `release` or `forget`  4 response (for
        `done`: an opaque string the daemon replays to duplicates)
Reply   ok (`forget`: forgotten 1, or 0 when a duplicate got the answer)
        error: code (invalid_argument) detail
Ends the in-flight state of a `pending` record: `done` stores the final response; `release`
keeps the hold for the key, so a retry gets the hold back at once (its outcome was unknown, e.g.
a provider's answer was lost, and the retry must finish the same purchase, not start another).
--]]
local function idem_finish(keys, args)
  local ikey = keys[1] .. ':i:' .. args[1] .. ':' .. args[2]
  -- `forget`: the daemon is withdrawing the key's hold, whose grant never reached the agent;
  -- unless a duplicate already got it (`replayed`), the record goes and a retry runs afresh.
  if args[3] == 'forget' then
    if redis.call('HGET', ikey, 'replayed') then return { 'ok', 'forgotten', '0' } end
    redis.call('DEL', ikey)
    return { 'ok', 'forgotten', '1' }
  end
  if redis.call('EXISTS', ikey) == 0 then return err('invalid_argument', 'unknown idempotency key') end
  if args[3] == 'done' then
    redis.call('HSET', ikey, 'status', 'done', 'response', args[4])
  elseif args[3] == 'release' then
    redis.call('HSET', ikey, 'status', 'granted')
  else
    return err('invalid_argument', 'outcome must be done or release')
  end
  return { 'ok' }
end

-- A settle's ok reply: the settle's figures, then the receipt facts of the settled hold that
-- the caller does not already have (a replay's time and settle details are the first settle's).
local function settled_reply(seq_s, amount_s, released_s, h, replayed, linked, finished)
  local r = { 'ok', 'seq', seq_s, 'amount', amount_s, 'released', released_s,
              'replayed', replayed, 'linked', linked, 'finished', finished or '0',
              'held', h.amount_s, 'task', h.task,
              'service', h.service, 'protocol', h.protocol, 'hdetails', h.details }
  if replayed == '1' then
    r[#r + 1], r[#r + 2], r[#r + 3], r[#r + 4] = 'ts', h.ended_at, 'sdetails', h.sdetails
  end
  return r
end

-- Stores a receipt the daemon signed before the settle (ARGV 8 on of spendcap_settle) for the
-- receipt `seq` just settled from hold `h`, if it is that receipt: the facts it states are the
-- hold's, and its predecessor is the chain head. Returns '1' if stored, else '0'.
local function link_presigned(P, args, seq, h, hold_id)
  if (args[8] or '') == '' or tonumber(args[8]) ~= seq or tonumber(args[12]) ~= h.amount
     or args[13] ~= h.task or args[14] ~= h.service or args[15] ~= h.protocol
     or args[16] ~= h.details then
    return '0'
  end
  local head = redis.call('HMGET', P .. ':rhead', 'seq', 'hash')
  if tonumber(head[1] or '0') ~= seq - 1 or (head[2] or '') ~= args[9] then return '0' end
  redis.call('HSET', P .. ':h:' .. hold_id, 'receipt', args[11], 'rhash', args[10])
  redis.call('HSET', P .. ':rhead', 'seq', fmt(seq), 'hash', args[10])
  return '1'
end

--[[ spendcap_settle
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 token_sha256|*  4 hold_id  5 amount (<= held; the rest is released)
        6 details JSON added to the log line and the receipt ('' for none)
        7 protocol the hold must have been made under ('' for any)
        8-16 (optional) the receipt, signed before the settle by a daemon that knows the hold's
        facts and guesses the chain head: 8 its seq  9 prev_hash  10 hash  11 signed receipt
        JSON, then the facts it states: 12 held  13 task  14 service  15 protocol
        16 hold details (its agent, hold, amount, time and settle details are ARGV 2, 4, 5, 1
        and 6). It is linked in this call if it is exactly this settle's receipt (same facts,
        its seq is the one assigned and its predecessor is the chain head); otherwise it is
        ignored and the daemon signs and links as usual.
        17 (optional) the idempotency key of the purchase this settle ends  18 its answer for
        duplicates: stored (`done`) in this call when the presigned receipt was linked (the
        answer names that receipt), so that a paid purchase needs no spendcap_idem_finish
        19 (optional) by: who settles on the admin side (an admin resolving an unknown hold),
        for the log entry
Reply   ok:    seq amount released replayed linked (1: the presigned receipt was linked)
               finished (1: the idempotency record of ARGV 17 now holds ARGV 18), then
               the receipt facts the caller does not know: held task service protocol hdetails,
               and for a replay also ts sdetails (the first settle's time and details; a new
               settle's are ARGV 1 and 6)
        error: code (unknown_agent | unauthorized | unknown_hold | hold_expired | hold_voided |
               hold_settled | amount_exceeds_hold | hold_protocol_mismatch | invalid_argument) detail
Settling a settled hold again with the same amount replays the first result (replayed = 1).
An `unknown` hold is settled like an open one (it is how a known charge resolves it).
The settle appends the hold id to <P>:receipts, whose length is the receipt's sequence number;
the settled hold keeps the receipt's facts, and the daemon signs and links the receipt
(spendcap_receipt_link, which also tells it the chain head when it guessed wrong).
--]]
local function settle(keys, args)
  local P = keys[1]
  local now, agent_id, token, hold_id = clock(args[1]), args[2], args[3], args[4]
  local amount, e = parse_money(args[5], 'amount')
  if not amount then return e end
  local now_s = fmt(now)
  local path, e2, own = auth_ending(P, agent_id, token)
  if not path then return e2 end
  if expire_due(P, now_s, EXPIRE_BATCH) > 0 then own = nil end
  local h = read_hold(P, hold_id)
  if not h or h.agent ~= agent_id then return err('unknown_hold', 'no hold ' .. hold_id) end
  if (args[7] or '') ~= '' and h.protocol ~= args[7] then
    return err('hold_protocol_mismatch', 'hold ' .. hold_id .. ' is a ' .. h.protocol .. ' payment')
  end
  if h.state == 'settled' then
    if h.settled ~= amount then
      return err('hold_settled', 'hold was already settled for ' .. fmt(h.settled))
    end
    return settled_reply(h.seq, fmt(amount), fmt(h.amount - amount), h, '1', '0')
  end
  if h.state == 'open' and h.expires_at <= now then
    end_hold(P, hold_id, h, path, 'expired', 0, now_s, 'hold_expired', '')
    h.state = 'expired'
  end
  lapse_approval(P, hold_id, h, now)
  if h.state == 'pending_approval' then
    return err('hold_pending_approval', 'hold ' .. hold_id .. ' waits for approval')
  end
  if h.state ~= 'open' and h.state ~= 'unknown' then return err('hold_' .. h.state, 'hold is ' .. h.state) end
  if amount > h.amount then
    return err('amount_exceeds_hold', 'settle amount ' .. fmt(amount) .. ' exceeds held ' .. fmt(h.amount))
  end
  local details = args[6]
  local seq = redis.call('RPUSH', P .. ':receipts', hold_id)
  local seq_s = fmt(seq)
  local settled_s, released_s = end_hold(P, hold_id, h, path, 'settled', amount, now_s, '', details,
                                         seq_s, own, args[19])
  local linked = link_presigned(P, args, seq, h, hold_id)
  local finished = '0'
  if linked == '1' then finished = finish_with(P, agent_id, args[17], hold_id, 'done', args[18]) end
  return settled_reply(seq_s, settled_s, released_s, h, '0', linked, finished)
end

--[[ spendcap_void
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 token_sha256|*  4 hold_id  5 reason
        6 protocol the hold must have been made under ('' for any)
        7 detail JSON for the log line ('' or absent for none; an admin's resolution, say)
        8 (optional) the idempotency key of the purchase this void ends  9 its answer for
        duplicates, stored (`done`) in this call
        10 (optional) by: who voids on the admin side (an admin resolving an unknown hold), for
        the log entry
Reply   ok: released replayed finished (1: the record of ARGV 8 now holds ARGV 9)
        error: code (unknown_hold | hold_settled | hold_expired | hold_protocol_mismatch) detail
Voiding a voided hold again replays (replayed = 1). An `unknown` hold is voided like an open
one: an admin (or the flow that learned no money moved) resolves it so. A hold waiting for
approval (`pending_approval`) is voided whatever ARGV 6 says: nothing was signed or sent for it,
so its agent may withdraw it (its approval becomes `canceled`).
--]]
local function void(keys, args)
  local P = keys[1]
  local now, agent_id, token, hold_id, reason = clock(args[1]), args[2], args[3], args[4], args[5]
  local now_s = fmt(now)
  local path, e, own = auth_ending(P, agent_id, token)
  if not path then return e end
  if expire_due(P, now_s, EXPIRE_BATCH) > 0 then own = nil end
  local h = read_hold(P, hold_id)
  if not h or h.agent ~= agent_id then return err('unknown_hold', 'no hold ' .. hold_id) end
  -- A payment still waiting for approval has signed and sent nothing, whatever its protocol:
  -- the agent may withdraw it through the generic void (and repeat that).
  local withdrawn = h.state == 'pending_approval' or (h.state == 'voided' and h.appr_state == 'canceled')
  if (args[6] or '') ~= '' and h.protocol ~= args[6] and not withdrawn then
    return err('hold_protocol_mismatch', 'hold ' .. hold_id .. ' is a ' .. h.protocol .. ' payment')
  end
  if h.state == 'voided' then
    local finished = finish_with(P, agent_id, args[8], hold_id, 'done', args[9])
    return { 'ok', 'released', fmt(h.amount), 'replayed', '1', 'finished', finished }
  end
  if h.state == 'open' and h.expires_at <= now then
    end_hold(P, hold_id, h, path, 'expired', 0, now_s, 'hold_expired', '')
    h.state = 'expired'
  end
  lapse_approval(P, hold_id, h, now)
  if h.state ~= 'open' and h.state ~= 'unknown' and h.state ~= 'pending_approval' then
    return err('hold_' .. h.state, 'hold is ' .. h.state)
  end
  end_hold(P, hold_id, h, path, 'voided', 0, now_s, reason, args[7] or '', nil, own, args[10])
  local finished = finish_with(P, agent_id, args[8], hold_id, 'done', args[9])
  return { 'ok', 'released', fmt(h.amount), 'replayed', '0', 'finished', finished }
end

--[[ spendcap_mark_unknown
KEYS[1] tree prefix
ARGV    1 now_ms  2 hold_id  3 reason (why the outcome is unknown, for the log)
        4 (optional) the idempotency key of the purchase: released in this call (a retry gets
        the hold back at once, as spendcap_idem_finish `release` does)
Reply   ok: agent amount replayed (1: the hold was already unknown) finished (1: released)
        error: code (unknown_hold | hold_settled | hold_voided | hold_expired) detail
An open hold whose payment may have moved money (the provider's answer was lost) becomes
`unknown`: it stays counted in `held` wherever it was charged (the agent and its ancestors,
buckets, period and task counters), it leaves the expiry index <P>:holds for <P>:unknown (by
the time it was marked), so it never expires, and one `unknown` log entry records the reason.
spendcap_settle and spendcap_void end it: that is how it is resolved. Marking it again changes
nothing. An open hold is marked even past its expiry time: until something released it, its
money is still counted, and the payment may have gone through before that time.
--]]
local function mark_unknown(keys, args)
  local P = keys[1]
  local now_s, hold_id, reason = fmt(clock(args[1])), args[2], args[3] or ''
  local h = read_hold(P, hold_id)
  if not h then return err('unknown_hold', 'no hold ' .. hold_id) end
  if h.state == 'unknown' then
    local finished = finish_with(P, h.agent, args[4], hold_id, 'release')
    return { 'ok', 'agent', h.agent, 'amount', h.amount_s, 'replayed', '1', 'finished', finished }
  end
  if h.state ~= 'open' then return err('hold_' .. h.state, 'hold is ' .. h.state) end
  redis.call('HSET', P .. ':h:' .. hold_id, 'state', 'unknown', 'unknown_at', now_s, 'unknown_reason', reason)
  redis.call('ZREM', P .. ':holds', hold_id)
  redis.call('ZADD', P .. ':unknown', now_s, hold_id)
  log(P, { 'ts', now_s, 'ev', 'unknown', 'agent', h.agent, 'task', h.task, 'svc', h.service,
           'proto', h.protocol, 'amt', h.amount_s, 'hold', hold_id, 'reason', reason })
  expire_due(P, now_s, EXPIRE_BATCH)
  local finished = finish_with(P, h.agent, args[4], hold_id, 'release')
  return { 'ok', 'agent', h.agent, 'amount', h.amount_s, 'replayed', '0', 'finished', finished }
end

--[[ spendcap_precheck
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 token_sha256|*  4 protocol  5 service  6 details JSON ('' for
        none)  7 task ('' for none)
Reply   ok      refused: code amount ('0') remaining ('0') limited_by
        error: code (unknown_agent | unauthorized) detail
The checks of spendcap_hold that need no amount (revoked, suspended, expired, protocol and
service lists, on the agent and every ancestor), made before anything is sent on the agent's
behalf, when the amount may not be known yet. A refusal appends a `refuse` entry exactly as a
refused hold does (amount 0); a pass writes nothing. The hold stays the authority for money.
--]]
local function precheck(keys, args)
  local P = keys[1]
  local now, agent_id = clock(args[1]), args[2]
  local path, e, forced_task = auth(P, agent_id, args[3], now)
  if not path then return e end
  local details = args[6] or ''
  local code, by = gate(read_path(P, path), now, args[4], args[5], details)
  if not code then return { 'ok' } end
  log(P, { 'ts', fmt(now), 'ev', 'refuse', 'agent', agent_id, 'task', forced_task or args[7] or '', 'svc', args[5],
           'proto', args[4], 'amt', '0', 'reason', code, 'remaining', '0', 'limited_by', by,
           'detail', details })
  return { 'refused', 'code', code, 'amount', '0', 'remaining', '0', 'limited_by', by }
end

--[[ spendcap_note
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 token_sha256|*  4 hold_id  5 reason code  6 detail JSON ('')
        7 (optional) the idempotency key of the hold's purchase: released in this call (a retry
        gets the hold back at once, as spendcap_idem_finish `release` does)
Reply   ok: finished (1: the key was released)
        error: code (unknown_agent | unauthorized | unknown_hold) detail
Appends a `note` entry about one of the agent's holds that changes no balance: a provider
rejected a signed payment, say, and the hold stays until its expiry. Replay ignores notes.
--]]
local function note(keys, args)
  local P = keys[1]
  local now, agent_id, hold_id = clock(args[1]), args[2], args[4]
  local path, e = auth(P, agent_id, args[3], now)
  if not path then return e end
  local h = read_hold(P, hold_id)
  if not h or h.agent ~= agent_id then return err('unknown_hold', 'no hold ' .. hold_id) end
  log(P, { 'ts', fmt(now), 'ev', 'note', 'agent', agent_id, 'task', h.task, 'svc', h.service,
           'proto', h.protocol, 'amt', fmt(h.amount), 'hold', hold_id, 'reason', args[5],
           'detail', args[6] })
  return { 'ok', 'finished', finish_with(P, agent_id, args[7], hold_id, 'release') }
end

--[[ spendcap_task_outcome
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 token_sha256|*  4 task (1..128 bytes)  5 task type (1..64 bytes)
        6 outcome (success | failed | abandoned)  7 by (optional: who reports it, for the log)
Reply   ok      error: code (unknown_agent | unauthorized | invalid_argument) detail
Appends one `outcome` entry (task, task type in `tt`, outcome in `reason`) that changes no
balance: the agent (or its orchestrator, as admin) says how a task ended, for the cost reports.
Replay ignores outcomes; a later outcome of the same task supersedes an earlier one.
--]]
local TASK_OUTCOMES = { success = true, failed = true, abandoned = true }
local function task_outcome(keys, args)
  local P = keys[1]
  local path, e = auth(P, args[2], args[3], clock(args[1]))
  if not path then return e end
  if not TASK_OUTCOMES[args[6]] then
    return err('invalid_argument', 'outcome must be success, failed or abandoned')
  end
  if #args[4] < 1 or #args[4] > 128 or #args[5] < 1 or #args[5] > 64 then
    return err('invalid_argument', 'task is 1 to 128 bytes and task type 1 to 64 bytes')
  end
  log(P, { 'ts', fmt(clock(args[1])), 'ev', 'outcome', 'agent', args[2], 'task', args[4],
           'tt', args[5], 'reason', args[6], 'by', args[7] or '' })
  return { 'ok' }
end

--[[ spendcap_create_bucket
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id (owner)  3 bucket_id ([A-Za-z0-9_.:-], 1..128)  4 cap
        5 exclusive (1: at most one open hold at a time)  6 label
        7 (optional) who registers it, `by` on the log entry (an admin's name, `agent:<id>`)
Reply   ok: created (1, or 0 if an identical bucket exists)
        error: code (unknown_agent | bucket_exists | invalid_argument) detail
A budget bucket is an extra limit that holds naming it are charged against, atomically with
the agent's own caps. Its key is <P>:b:<bucket_id>: agent cap spent held open exclusive label.
--]]
local function create_bucket(keys, args)
  local P = keys[1]
  local now, agent_id, id = clock(args[1]), args[2], args[3]
  local cap, e = parse_money(args[4], 'cap')
  if not cap then return e end
  if #id < 1 or #id > 128 or not string.match(id, '^[%w_%.:%-]+$') then
    return err('invalid_argument', 'bucket id must be 1 to 128 characters of [A-Za-z0-9_.:-]')
  end
  if redis.call('EXISTS', P .. ':a:' .. agent_id) == 0 then return err('unknown_agent', agent_id) end
  local bkey = P .. ':b:' .. id
  local b = redis.call('HMGET', bkey, 'agent', 'cap', 'exclusive')
  if b[1] then
    if b[1] == agent_id and tonumber(b[2]) == cap and b[3] == args[5] then
      return { 'ok', 'created', '0' }
    end
    return err('bucket_exists', 'budget ' .. id .. ' exists with other terms')
  end
  redis.call('HSET', bkey, 'agent', agent_id, 'cap', fmt(cap), 'spent', '0', 'held', '0',
             'open', '0', 'exclusive', args[5], 'label', args[6])
  log(P, { 'ts', fmt(now), 'ev', 'budget', 'agent', agent_id, 'cap', fmt(cap), 'bk', id,
           'detail', args[6], 'by', args[7] or '' })
  return { 'ok', 'created', '1' }
end

--[[ spendcap_attr_set_once
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 name ([a-z0-9_], 1..32)  4 value
Reply   ok: value (the stored value: this one, or the one set first)
Stores a value on the agent (field x:<name> of its hash) unless one is already there; an AP2
signing key, say, which every instance must agree on.
--]]
local function attr_set_once(keys, args)
  local P = keys[1]
  local akey = P .. ':a:' .. args[2]
  if redis.call('EXISTS', akey) == 0 then return err('unknown_agent', args[2]) end
  if #args[3] < 1 or #args[3] > 32 or not string.match(args[3], '^[a-z0-9_]+$') then
    return err('invalid_argument', 'attribute names are 1 to 32 characters of [a-z0-9_]')
  end
  if redis.call('HSETNX', akey, 'x:' .. args[3], args[4]) == 1 then
    log(P, { 'ts', fmt(clock(args[1])), 'ev', 'attr', 'agent', args[2], 'reason', args[3] })
  end
  return { 'ok', 'value', redis.call('HGET', akey, 'x:' .. args[3]) }
end

--[[ spendcap_create_agent
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 handle  4 parent_id ('' for a root)  5 cap  6 expires_at_ms ('')
        7 labels JSON  8 token_sha256  9 controls JSON ('' or absent: none; see the header)
        10 alert thresholds (ascending percents, e.g. `50,80,100`; '' or absent: none)
        11 task_of (a sub-agent created for this task of its parent: its holds spend the
        parent's per-task budget of that task; '' or absent: none)  12 reason (optional:
        `sub_agent` when an agent created it under itself)  13 by (optional)
Reply   ok: depth      error: code (agent_exists | unknown_parent | tree_too_deep | invalid_argument)
Creating a tree's first agent also creates the consumer group `alerts` on the tree's log, so
the daemon's alert consumer sees every entry from the tree's beginning.
--]]
local function create_agent(keys, args)
  local P = keys[1]
  local now, agent_id, handle, parent = clock(args[1]), args[2], args[3], args[4]
  local cap, e = parse_money(args[5], 'cap')
  if not cap then return e end
  local ctl, alerts, task_of = args[9] or '', args[10] or '', args[11] or ''
  if ctl ~= '' then
    local _, e2 = parse_ctl(ctl)
    if e2 then return e2 end
  end
  if alerts ~= '' then
    local _, e3 = parse_alerts(alerts)
    if e3 then return e3 end
  end
  if task_of ~= '' and parent == '' then
    return err('invalid_argument', 'only a sub-agent can be created for a task of its parent')
  end
  local akey = P .. ':a:' .. agent_id
  if redis.call('EXISTS', akey) == 1 then return err('agent_exists', agent_id) end
  local path, depth = agent_id, 1
  if parent ~= '' then
    local p = redis.call('HMGET', P .. ':a:' .. parent, 'path', 'depth')
    if not p[1] then return err('unknown_parent', 'no agent ' .. parent .. ' in this tree') end
    depth = tonumber(p[2]) + 1
    if depth > MAX_DEPTH then
      return err('tree_too_deep', 'a budget tree is at most ' .. MAX_DEPTH .. ' levels deep')
    end
    path = agent_id .. ',' .. p[1]
  else
    -- BUSYGROUP (the tree already has its group) is fine.
    redis.pcall('XGROUP', 'CREATE', P .. ':log', 'alerts', '$', 'MKSTREAM')
  end
  -- The fields every hold and settle reads come first: a small hash is a listpack, which HMGET
  -- scans from the front for each field it asks for.
  redis.call('HSET', akey, 'token', args[8], 'path', path, 'cap', fmt(cap), 'spent', '0', 'held', '0',
             'revoked', '', 'expires_at', args[6], 'handle', handle, 'parent', parent,
             'depth', fmt(depth), 'revoked_at', '', 'created_at', fmt(now), 'labels', args[7])
  if ctl ~= '' then redis.call('HSET', akey, 'ctl', ctl) end
  if alerts ~= '' then redis.call('HSET', akey, 'alerts', alerts) end
  if task_of ~= '' then redis.call('HSET', akey, 'task_of', task_of) end
  redis.call('SADD', P .. ':agents', agent_id)
  local entry = { 'ts', fmt(now), 'ev', 'create', 'agent', agent_id, 'cap', fmt(cap), 'parent', parent,
                  'detail', args[7], 'reason', args[12] or '', 'by', args[13] or '' }
  if task_of ~= '' then
    entry[#entry + 1] = 'task'
    entry[#entry + 1] = task_of
  end
  log(P, entry)
  return { 'ok', 'depth', fmt(depth) }
end

--[[ spendcap_set_controls
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 controls JSON ('' for none)  4 alert thresholds ('' for none)
        5 by (optional)  6 expected current controls JSON, with a leading '=' (optional: a
        compare-and-set; an operator token's change, which the daemon judged no looser than
        these): when the stored controls differ, nothing changes (changed_meanwhile)
Reply   ok      error: code (unknown_agent | invalid_argument | changed_meanwhile) detail
Replaces the agent's controls and alert thresholds; logs a `controls` entry whose detail is
{"controls": <the controls or null>, "alerts": "<thresholds>"}. Nothing changes on an error.
--]]
local function set_controls(keys, args)
  local P = keys[1]
  local now, agent_id, ctl, alerts = clock(args[1]), args[2], args[3] or '', args[4] or ''
  local akey = P .. ':a:' .. agent_id
  if redis.call('EXISTS', akey) == 0 then return err('unknown_agent', 'no agent ' .. agent_id) end
  if ctl ~= '' then
    local _, e = parse_ctl(ctl)
    if e then return e end
  end
  if alerts ~= '' then
    local _, e = parse_alerts(alerts)
    if e then return e end
  end
  local expected = args[6] or ''
  if expected ~= '' and '=' .. (redis.call('HGET', akey, 'ctl') or '') ~= expected then
    return err('changed_meanwhile', 'the controls changed since they were read; read them again')
  end
  if ctl ~= '' then redis.call('HSET', akey, 'ctl', ctl) else redis.call('HDEL', akey, 'ctl') end
  if alerts ~= '' then redis.call('HSET', akey, 'alerts', alerts) else redis.call('HDEL', akey, 'alerts') end
  local shown = ctl
  if shown == '' then shown = 'null' end
  log(P, { 'ts', fmt(now), 'ev', 'controls', 'agent', agent_id,
           'detail', '{"controls":' .. shown .. ',"alerts":' .. cjson.encode(alerts) .. '}', 'by', args[5] or '' })
  return { 'ok' }
end

--[[ spendcap_set_expiry
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 expires_at_ms ('' for never)  4 by (optional)
        5 '1': earlier only (an operator token: the new expiry must be set and no later than the
        current one, decided here against the current value)
Reply   ok: previous      error: code (unknown_agent | invalid_argument | role_forbidden) detail
Holds at or after the expiry are refused with `agent_expired` (on every descendant too). Logs
an `expiry` entry whose detail is {"expires_at_ms": <ms or null>}.
--]]
local function set_expiry(keys, args)
  local P = keys[1]
  local now, agent_id, at = clock(args[1]), args[2], args[3] or ''
  if at ~= '' and not is_int(tonumber(at), 0, 9007199254740991) then
    return err('invalid_argument', 'expires_at_ms must be an integer number of milliseconds')
  end
  local akey = P .. ':a:' .. agent_id
  local a = redis.call('HMGET', akey, 'path', 'expires_at')
  if not a[1] then return err('unknown_agent', 'no agent ' .. agent_id) end
  if args[5] == '1' and (at == '' or ((a[2] or '') ~= '' and tonumber(at) > tonumber(a[2]))) then
    return err('role_forbidden', 'this token may only make an expiry earlier')
  end
  redis.call('HSET', akey, 'expires_at', at)
  local shown = at
  if shown == '' then shown = 'null' end
  log(P, { 'ts', fmt(now), 'ev', 'expiry', 'agent', agent_id, 'detail', '{"expires_at_ms":' .. shown .. '}',
           'by', args[4] or '' })
  return { 'ok', 'previous', a[2] or '' }
end

--[[ spendcap_reinstate — callable from redis-cli like spendcap_revoke:
  redis-cli FCALL spendcap_reinstate 1 '<ns>:{<tree>}' <agent_id> [now_ms]
KEYS[1] tree prefix
ARGV    1 agent_id  2 now_ms (optional, ignored: Redis TIME)  3 by (optional)
Reply   ok: was (the suspension reason it lifted; '' if the agent was not suspended)
        error: code (unknown_agent)
Lifts a suspension and clears the runaway-loop breaker's memory (recent holds, repeat streak),
so the agent starts afresh; logs a `reinstate` entry with the lifted reason.
--]]
local function reinstate(keys, args)
  local P = keys[1]
  local agent_id = args[1]
  local now = clock(args[2])
  local akey = P .. ':a:' .. agent_id
  local a = redis.call('HMGET', akey, 'path', 'suspended')
  if not a[1] then return err('unknown_agent', 'no agent ' .. agent_id) end
  local was = a[2] or ''
  if was == '' then return { 'ok', 'was', '' } end
  redis.call('HDEL', akey, 'suspended', 'suspended_at', 'rsig', 'rcount', 'ssum')
  redis.call('DEL', P .. ':vh:' .. agent_id, P .. ':vs:' .. agent_id)
  log(P, { 'ts', fmt(now), 'ev', 'reinstate', 'agent', agent_id, 'reason', was, 'by', args[3] or '' })
  return { 'ok', 'was', was }
end

--[[ spendcap_set_cap
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 cap  4 by (who, for the log; optional)  5 '1': lower only (optional)
Reply   ok: previous      error: code (unknown_agent | cap_below_committed | invalid_argument |
        role_forbidden)
A cap below what is already spent + held is refused: the cap invariant holds at every instant.
With "lower only" (an operator token), a cap above the current one is refused, decided here
against the current cap, so no concurrent change slips between a check and the write.
--]]
local function set_cap(keys, args)
  local P = keys[1]
  local now, agent_id = clock(args[1]), args[2]
  local cap, e = parse_money(args[3], 'cap')
  if not cap then return e end
  local akey = P .. ':a:' .. agent_id
  if redis.call('EXISTS', akey) == 0 then return err('unknown_agent', 'no agent ' .. agent_id) end
  expire_due(P, fmt(now), EXPIRE_MAX)
  local a = redis.call('HMGET', akey, 'cap', 'spent', 'held')
  if args[5] == '1' and cap > tonumber(a[1]) then
    return err('role_forbidden', 'this token may only lower a cap (it is ' .. a[1] .. ')')
  end
  local committed = tonumber(a[2]) + tonumber(a[3])
  if cap < committed then
    return err('cap_below_committed', 'spent + held is ' .. fmt(committed))
  end
  redis.call('HSET', akey, 'cap', fmt(cap))
  log(P, { 'ts', fmt(now), 'ev', 'cap', 'agent', agent_id, 'cap', fmt(cap), 'amt', a[1], 'by', args[4] or '' })
  return { 'ok', 'previous', a[1] }
end

-- Defined with the orchestrator functions below; spendcap_revoke uses it for an agent caller.
local live_ancestor

--[[ spendcap_revoke — callable by orchestration scripts straight from redis-cli:
  redis-cli FCALL spendcap_revoke 1 '<ns>:{<tree>}' <agent_id> <reason_code>
KEYS[1] tree prefix
ARGV    1 agent_id  2 reason code ([A-Za-z0-9_.-], 1..64 chars)  3 now_ms (optional, ignored: Redis TIME)
        4 by (who, for the log; optional)  5 calling agent id (optional: an agent revoking one
        of its descendants; it must be live and an ancestor, else not_descendant / its refusal)
        6 the calling agent's token sha256 (with 5)
Reply   ok: revoked_at already      error: code (unknown_agent | invalid_argument | not_descendant | …)
Takes effect on the agent's (and every descendant's) very next hold: spendcap_hold checks every
level's `revoked` field. Revoking an agent that is already revoked changes nothing.
--]]
local function revoke(keys, args)
  local P = keys[1]
  local agent_id, reason = args[1], args[2]
  if not reason or #reason < 1 or #reason > 64 or not string.match(reason, '^[%w_%.%-]+$') then
    return err('invalid_argument', 'reason must be 1 to 64 characters of [A-Za-z0-9_.-]')
  end
  local now = clock(args[3])
  local akey = P .. ':a:' .. agent_id
  local a = redis.call('HMGET', akey, 'cap', 'revoked', 'revoked_at', 'path')
  if not a[1] then return err('unknown_agent', 'no agent ' .. agent_id) end
  -- An agent revoking one of its descendants (POST /v1/me/agents/{agent}/revoke).
  local caller = args[5] or ''
  if caller ~= '' then
    local e = live_ancestor(P, caller, args[6] or '', now, a[4], agent_id)
    if e then return e end
  end
  if a[2] ~= '' then return { 'ok', 'revoked_at', a[3], 'already', '1' } end
  redis.call('HSET', akey, 'revoked', reason, 'revoked_at', fmt(now))
  log(P, { 'ts', fmt(now), 'ev', 'revoke', 'agent', agent_id, 'reason', reason, 'by', args[4] or '' })
  return { 'ok', 'revoked_at', fmt(now), 'already', '0' }
end

--[[ spendcap_archive — callable from redis-cli like spendcap_revoke:
  redis-cli FCALL spendcap_archive 1 '<ns>:{<tree>}' <agent_id>
KEYS[1] tree prefix
ARGV    1 agent_id  2 now_ms (optional, ignored: Redis TIME)  3 by (optional)
Reply   ok: archived_at already handle      error: code (unknown_agent)
Archives an agent for good: revokes it (reason `archived`) unless it is revoked already, records
`archived` (the time) and logs an `archive` entry. Its hash, holds, receipts and log entries stay,
so its history is still attributed to it; the daemon then frees its handle in `<ns>:handles` (a
global key no function touches). Archiving an archived agent changes nothing.
--]]
local function archive(keys, args)
  local P = keys[1]
  local agent_id = args[1]
  local now = clock(args[2])
  local akey = P .. ':a:' .. agent_id
  local a = redis.call('HMGET', akey, 'handle', 'revoked', 'archived')
  if not a[1] then return err('unknown_agent', 'no agent ' .. agent_id) end
  if a[3] and a[3] ~= '' then return { 'ok', 'archived_at', a[3], 'already', '1', 'handle', a[1] } end
  if not a[2] or a[2] == '' then
    redis.call('HSET', akey, 'revoked', 'archived', 'revoked_at', fmt(now))
  end
  redis.call('HSET', akey, 'archived', fmt(now))
  log(P, { 'ts', fmt(now), 'ev', 'archive', 'agent', agent_id, 'reason', 'archived', 'by', args[3] or '' })
  return { 'ok', 'archived_at', fmt(now), 'already', '0', 'handle', a[1] }
end

--[[ spendcap_rotate_token
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 new token_sha256  4 by (optional)
Reply   ok       error: code (unknown_agent)
The old token stops working at once, on every instance (holds check the hash inside the script).
--]]
local function rotate_token(keys, args)
  local P = keys[1]
  local akey = P .. ':a:' .. args[2]
  if redis.call('EXISTS', akey) == 0 then return err('unknown_agent', 'no agent ' .. args[2]) end
  redis.call('HSET', akey, 'token', args[3])
  log(P, { 'ts', fmt(clock(args[1])), 'ev', 'rotate', 'agent', args[2], 'by', args[4] or '' })
  return { 'ok' }
end

--[[ spendcap_balance
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 token_sha256|*
Reply   ok: cap spent held remaining available limited_by revoked revoked_at expires_at
            suspended suspended_at
        error: code (unknown_agent | unauthorized)
Releases due holds first, so the figures never include money that has already come back.
`remaining` is the agent's own cap - spent - held; `available` also counts every ancestor.
--]]
local function balance(keys, args)
  local P = keys[1]
  local now, agent_id = clock(args[1]), args[2]
  local path, e = auth(P, agent_id, args[3], now)
  if not path then return e end
  expire_due(P, fmt(now), EXPIRE_MAX)
  local levels = read_path(P, path)
  local me = levels[1]
  local avail, by = available(levels)
  local own = me.cap - me.spent - me.held
  if own < 0 then own = 0 end
  local a = redis.call('HMGET', P .. ':a:' .. agent_id, 'revoked_at', 'suspended_at')
  return { 'ok', 'cap', fmt(me.cap), 'spent', fmt(me.spent), 'held', fmt(me.held),
           'remaining', fmt(own), 'available', fmt(avail), 'limited_by', by,
           'revoked', me.revoked or '', 'revoked_at', a[1] or '', 'expires_at', me.expires_at or '',
           'suspended', me.suspended or '', 'suspended_at', a[2] or '' }
end

--[[ spendcap_expire
KEYS[1] tree prefix
ARGV    1 now_ms
Reply   ok: released
Releases up to EXPIRE_MAX due holds of the tree. The daemon's optional sweeper calls it; no
correctness depends on it.
--]]
local function expire(keys, args)
  local released = 0
  local more = true
  while more and released < EXPIRE_MAX do
    local n
    n, more = expire_due(keys[1], fmt(clock(args[1])), EXPIRE_BATCH)
    released = released + n
  end
  return { 'ok', 'released', fmt(released) }
end

--[[ spendcap_receipt_link
KEYS[1] tree prefix
ARGV    one or more groups of five, in sequence order (at most MAX_LINKS groups):
        seq  prev_hash (the hash the receipt names)  hash  signed receipt JSON  hold_id (the
        settled hold the receipt is for; it stores the signed receipt)
Reply   ok: linked (how many were stored now; receipts already linked are skipped)
        error: code (receipt_gap: the head is not at seq - 1 with that hash) head_seq head_hash
Advances the tree's receipt chain head receipt by receipt. Receipt signing is deterministic, so
two instances that link the same receipt store the same bytes; a daemon that finds a gap before
its own receipt signs and links the missing ones too, in one call.
--]]
local MAX_LINKS = 256
local function receipt_link(keys, args)
  local P = keys[1]
  if #args % 5 ~= 0 or #args == 0 or #args > 5 * MAX_LINKS then
    return err('invalid_argument', 'arguments come in groups of five, at most ' .. MAX_LINKS)
  end
  local head = redis.call('HMGET', P .. ':rhead', 'seq', 'hash')
  local head_seq, head_hash = tonumber(head[1] or '0'), head[2] or ''
  local linked = 0
  for g = 1, #args, 5 do
    local seq, prev, hash, signed, hold_id = tonumber(args[g]), args[g + 1], args[g + 2], args[g + 3], args[g + 4]
    if head_seq < seq then
      if head_seq ~= seq - 1 or head_hash ~= prev then
        return { 'error', 'code', 'receipt_gap', 'head_seq', fmt(head_seq), 'head_hash', head_hash }
      end
      if redis.call('LINDEX', P .. ':receipts', seq - 1) ~= hold_id then
        return err('invalid_argument', 'receipt ' .. fmt(seq) .. ' is not for hold ' .. hold_id)
      end
      redis.call('HSET', P .. ':h:' .. hold_id, 'receipt', signed, 'rhash', hash)
      head_seq, head_hash = seq, hash
      linked = linked + 1
    end
  end
  if linked > 0 then redis.call('HSET', P .. ':rhead', 'seq', fmt(head_seq), 'hash', head_hash) end
  return { 'ok', 'linked', fmt(linked) }
end


-- ---------------------------------------------------------------------------------------------
-- Orchestrators: agents that fund sub-agents and mint task-scoped tokens (issue 18).

local MAX_SUB_AGENTS = 1000
local MAX_TASK_TOKEN_TTL_MS = 30 * DAY_MS
local TOKEN_RETENTION_MS = 7 * DAY_MS

-- Authenticates `caller` by its own token (a task token may not manage anything) and checks it
-- is live (not revoked, suspended or expired, nor any ancestor). When `target_path` is given,
-- the target (`target_id`) must be a descendant of the caller: anything else (the caller itself
-- included) is `not_descendant`, as if it did not exist. Returns nil or an error
-- reply, and the caller's levels.
live_ancestor = function(P, caller, token, now, target_path, target_id)
  local a = redis.call('HMGET', P .. ':a:' .. caller, 'token', 'path')
  if not a[1] then return err('unknown_agent', 'no agent ' .. caller) end
  if string.byte(token, 1) == 116 then
    return err('task_token_not_allowed', 'a task token can pay, not manage agents or tokens')
  end
  if token ~= '*' and a[1] ~= token then return err('unauthorized', 'token does not match') end
  if target_path then
    local found = false
    for _, id in ipairs(split_path(target_path)) do
      if id == caller and id ~= target_id then found = true end
    end
    if not found then return err('not_descendant', 'no agent ' .. target_id .. ' under ' .. caller) end
  end
  local levels = read_path(P, a[2])
  local code, by = standing_refusal(levels, now)
  if code then return err(code, by) end
  return nil, levels
end

-- Whether `id` is on `path` (an agent's path: itself, then its ancestors).
local function on_path(path, id)
  for _, p in ipairs(split_path(path)) do
    if p == id then return true end
  end
  return false
end

-- The remaining room of a period limit of `c` on `agent` now (limit - spent - held this period).
local function period_room(P, agent, c, kind, now)
  local v = redis.call('HMGET', P .. ':p:' .. agent .. ':' .. kind .. ':' .. fmt(period_start(kind, now)),
                       'spent', 'held')
  local room = c[kind] - tonumber(v[1] or '0') - tonumber(v[2] or '0')
  if room < 0 then room = 0 end
  return room
end

--[[ spendcap_create_sub_agent
KEYS[1] tree prefix
ARGV    1 now_ms  2 caller agent id  3 caller's token sha256 (its own token: a task token is
        refused)  4 new agent id  5 handle  6 cap  7 expires_at ('' for none)  8 labels JSON
        9 new token sha256  10 controls JSON ('')  11 alert thresholds ('')  12 task_of ('')
Reply   ok: depth
        error: code (unknown_agent | unauthorized | task_token_not_allowed | agent_revoked |
               agent_suspended | agent_expired (detail: who) | sub_agent_exceeds_parent (detail
               `<bound>: …`, bound one of cap expires_at per_payment daily weekly monthly
               all_time task svc_allow svc_deny proto_allow proto_deny) | too_many_sub_agents |
               and spendcap_create_agent's) detail
An agent creates a sub-agent under itself, funded from what it has: the child's cap is at most
the caller's available room (cap - spent - held over itself and every ancestor) less what the
caller's other sub-agents created this way (live ones) can still spend; the child's stated
controls are at most as loose as the caller's own (limits not above the caller's, period limits
not above what is left of the caller's this period, allow-lists within the caller's, deny-lists
containing the caller's; what it does not state it inherits, as every ancestor's controls apply
to the whole subtree), and its expiry not after the caller's effective one. Decided on the
current balances (due holds released first) in this one call, so concurrent creations never
promise more than the caller has. A refused creation changes nothing and logs nothing; a
created one logs one `create` entry (reason `sub_agent`).
--]]
local function create_sub_agent(keys, args)
  local P = keys[1]
  local now, caller = clock(args[1]), args[2]
  local cap, e = parse_money(args[6], 'cap')
  if not cap then return e end
  local ctl = args[10] or ''
  local cc = {}
  if ctl ~= '' then
    local parsed, e2 = parse_ctl(ctl)
    if e2 then return e2 end
    cc = parsed
  end
  local e3, levels = live_ancestor(P, caller, args[3], now)
  if e3 then return e3 end
  -- Balances decide: release due holds first (then read the levels again).
  if expire_due(P, fmt(now), EXPIRE_MAX) > 0 then
    levels = read_path(P, redis.call('HGET', P .. ':a:' .. caller, 'path'))
  end
  local room = available(levels)
  local subs = redis.call('SMEMBERS', P .. ':sub:' .. caller)
  if #subs >= MAX_SUB_AGENTS then
    return err('too_many_sub_agents', 'an agent creates at most ' .. MAX_SUB_AGENTS .. ' sub-agents')
  end
  for _, id in ipairs(subs) do
    local v = redis.call('HMGET', P .. ':a:' .. id, 'cap', 'spent', 'held', 'revoked', 'expires_at')
    local dead = (v[4] and v[4] ~= '') or (v[5] and v[5] ~= '' and tonumber(v[5]) <= now)
    if v[1] and not dead then
      local unused = tonumber(v[1]) - tonumber(v[2]) - tonumber(v[3])
      if unused > 0 then room = room - unused end
    end
  end
  if room < 0 then room = 0 end
  local function exceeds(bound, detail)
    return err('sub_agent_exceeds_parent', bound .. ': ' .. detail)
  end
  if cap > room then
    return exceeds('cap', 'the cap ' .. fmt(cap) .. ' is above what the parent has left to give, '
                   .. fmt(room))
  end
  local latest = nil
  for _, l in ipairs(levels) do
    if l.expires_at and l.expires_at ~= '' then
      local t = tonumber(l.expires_at)
      if latest == nil or t < latest then latest = t end
    end
  end
  if latest and args[7] ~= '' and tonumber(args[7]) > latest then
    return exceeds('expires_at', 'the expiry is after the parent\'s, ' .. fmt(latest))
  end
  local mine = levels[1].ctl
  if mine and mine ~= '' then
    local c = cjson.decode(mine)
    for _, k in ipairs({ 'per_payment', 'task' }) do
      if cc[k] and c[k] and cc[k] > c[k] then
        return exceeds(k, 'the ' .. k .. ' limit is above the parent\'s, ' .. fmt(c[k]))
      end
    end
    for _, k in ipairs(COUNTED_PERIODS) do
      if cc[k] and c[k] then
        local left = period_room(P, caller, c, k, now)
        if cc[k] > left then
          return exceeds(k, 'the ' .. k .. ' limit is above what is left of the parent\'s, ' .. fmt(left))
        end
      end
    end
    for _, k in ipairs({ 'svc_allow', 'proto_allow' }) do
      if c[k] and #c[k] > 0 and cc[k] and #cc[k] > 0 then
        for _, name in ipairs(cc[k]) do
          if not listed(c[k], { name }) then
            return exceeds(k, name .. ' is not on the parent\'s ' .. k .. ' list')
          end
        end
      end
    end
    for _, k in ipairs({ 'svc_deny', 'proto_deny' }) do
      if c[k] and #c[k] > 0 and cc[k] and #cc[k] > 0 then
        local have = {}
        for _, name in ipairs(cc[k]) do have[name] = true end
        for _, name in ipairs(c[k]) do
          if not have[name] then
            return exceeds(k, 'the list leaves out ' .. name .. ', on the parent\'s ' .. k .. ' list')
          end
        end
      end
    end
  end
  local created = create_agent(keys, { args[1], args[4], args[5], caller, args[6], args[7], args[8],
                                       args[9], ctl, args[11] or '', args[12] or '', 'sub_agent',
                                       'agent:' .. caller })
  if created[1] == 'ok' then redis.call('SADD', P .. ':sub:' .. caller, args[4]) end
  return created
end

-- Who a task-token change is by, for the log: `agent:<id>` for an agent caller, else the
-- admin-side principal's name (`by`, possibly '').
local function actor_of(caller, by)
  if caller ~= '' then return 'agent:' .. caller end
  return by or ''
end

--[[ spendcap_create_task_token
KEYS[1] tree prefix
ARGV    1 now_ms  2 caller agent id ('' for the admin)  3 caller's token sha256 ('*' for the
        admin)  4 the agent the token is for (the caller or a descendant)  5 token id (hex)
        6 the token's sha256  7 task (1..128 bytes)  8 ttl ms (1000 .. 30 days)  9 by (optional:
        the admin-side principal, for the log; an agent caller is logged as `agent:<id>`)
Reply   ok: expires_at
        error: code (unknown_agent | unauthorized | task_token_not_allowed | not_descendant |
               agent_revoked | agent_suspended | agent_expired | token_exists |
               invalid_argument) detail
A task-scoped token `<P>:tt:<id>` (hash: agent hash task expires_at created_at by, once revoked
revoked; listed in the set `<P>:tts:<agent>`): check_token accepts `t<id>:<sha256>` for the
agent until expires_at by the ledger's clock, and a hold made with it is that task's. Logs one
`token` entry (reason `created`).
--]]
local function create_task_token(keys, args)
  local P = keys[1]
  local now, caller, target, id, task = clock(args[1]), args[2], args[4], args[5], args[7]
  local ttl = tonumber(args[8])
  if #task < 1 or #task > 128 then return err('invalid_argument', 'task is 1 to 128 bytes') end
  if not is_int(ttl, 1000, MAX_TASK_TOKEN_TTL_MS) then
    return err('invalid_argument', 'ttl must be from 1 s to 30 days')
  end
  if not string.match(id, '^%x+$') then return err('invalid_argument', 'token id is hex') end
  if caller ~= '' then
    local e = live_ancestor(P, caller, args[3], now)
    if e then return e end
  end
  local t = redis.call('HMGET', P .. ':a:' .. target, 'path')
  if not t[1] then
    if caller ~= '' then return err('not_descendant', 'no agent ' .. target .. ' under ' .. caller) end
    return err('unknown_agent', 'no agent ' .. target)
  end
  if caller ~= '' and not on_path(t[1], caller) then
    return err('not_descendant', 'no agent ' .. target .. ' under ' .. caller)
  end
  local code, by = standing_refusal(read_path(P, t[1]), now)
  if code then return err(code, by) end
  local tkey = P .. ':tt:' .. id
  if redis.call('EXISTS', tkey) == 1 then return err('token_exists', id) end
  local expires_s = fmt(now + ttl)
  redis.call('HSET', tkey, 'agent', target, 'hash', args[6], 'task', task, 'expires_at', expires_s,
             'created_at', fmt(now), 'by', caller)
  redis.call('PEXPIRE', tkey, ttl + TOKEN_RETENTION_MS)
  redis.call('SADD', P .. ':tts:' .. target, id)
  log(P, { 'ts', fmt(now), 'ev', 'token', 'agent', target, 'task', task, 'reason', 'created',
           'detail', '{"token_id":' .. cjson.encode(id) .. ',"expires_at_ms":' .. expires_s
                     .. ',"by":' .. cjson.encode(caller) .. '}', 'by', actor_of(caller, args[9]) })
  return { 'ok', 'expires_at', expires_s }
end

--[[ spendcap_revoke_task_token
KEYS[1] tree prefix
ARGV    1 now_ms  2 caller agent id ('' for the admin)  3 caller's token sha256 ('*')  4 token id
        5 the agent the token must be for ('' for any: the admin by token id)  6 by (optional, as
        spendcap_create_task_token's ARGV 9)
Reply   ok: already (1: it was revoked before; nothing changed)
        error: code (unknown_token | unknown_agent | unauthorized | task_token_not_allowed |
               agent_revoked | agent_suspended | agent_expired) detail
Revokes a task token of the caller or of one of its descendants (anything else is
`unknown_token`), at once: check_token reads `revoked`. Logs one `token` entry (reason
`revoked`).
--]]
local function revoke_task_token(keys, args)
  local P = keys[1]
  local now, caller, id, want = clock(args[1]), args[2], args[4], args[5] or ''
  if caller ~= '' then
    local e = live_ancestor(P, caller, args[3], now)
    if e then return e end
  end
  local tkey = P .. ':tt:' .. id
  local t = redis.call('HMGET', tkey, 'agent', 'revoked', 'task')
  if not t[1] or (want ~= '' and t[1] ~= want) then return err('unknown_token', 'no task token ' .. id) end
  if caller ~= '' and not on_path(redis.call('HGET', P .. ':a:' .. t[1], 'path') or '', caller) then
    return err('unknown_token', 'no task token ' .. id)
  end
  if t[2] and t[2] ~= '' then return { 'ok', 'already', '1' } end
  redis.call('HSET', tkey, 'revoked', fmt(now))
  log(P, { 'ts', fmt(now), 'ev', 'token', 'agent', t[1], 'task', t[3], 'reason', 'revoked',
           'detail', '{"token_id":' .. cjson.encode(id) .. ',"by":' .. cjson.encode(caller) .. '}',
           'by', actor_of(caller, args[6]) })
  return { 'ok', 'already', '0' }
end

--[[ spendcap_approval_decide
KEYS[1] tree prefix
ARGV    1 now_ms  2 approval id (the waiting hold's id)  3 decision: approve | deny  4 by (who
        decides)  5 note
Reply   ok: state (approved | denied) agent amount expires_at replayed (1: already decided so)
        error: code (approval_not_found | approval_expired | approval_decided | invalid_argument)
A `pending_approval` hold is decided exactly once. Approve: the hold becomes `open` with its own
lifetime from now (`life`), one `approve` log entry (detail {by, note}); the agent's repeated
request resumes it. Deny: the hold is voided (reason approval_denied, detail {by, note}), its
money released. A pending approval whose time ran out is released here (reason
approval_expired) and the decision refused; the hold's expiry releases it as well, so no
sweeper is needed.
--]]
local function approval_decide(keys, args)
  local P = keys[1]
  local now = clock(args[1])
  local now_s, hold_id, decision = fmt(now), args[2], args[3]
  local by, note = args[4] or '', args[5] or ''
  if decision ~= 'approve' and decision ~= 'deny' then
    return err('invalid_argument', 'decision must be approve or deny')
  end
  expire_due(P, now_s, EXPIRE_BATCH)
  local h = read_hold(P, hold_id)
  if not h or (h.appr or '') == '' then return err('approval_not_found', 'no approval ' .. hold_id) end
  lapse_approval(P, hold_id, h, now)
  local want = 'approved'
  if decision == 'deny' then want = 'denied' end
  local function ok(replayed)
    return { 'ok', 'state', want, 'agent', h.agent, 'amount', h.amount_s,
             'expires_at', fmt(h.expires_at), 'replayed', replayed }
  end
  if h.appr_state == want then return ok('1') end
  if h.appr_state == 'expired' then return err('approval_expired', 'approval ' .. hold_id .. ' expired') end
  if h.appr_state ~= 'pending' then
    return err('approval_decided', 'approval ' .. hold_id .. ' is ' .. tostring(h.appr_state))
  end
  local detail = cjson.encode({ by = by, note = note })
  local hkey = P .. ':h:' .. hold_id
  redis.call('HSET', hkey, 'appr_by', by, 'appr_note', note, 'appr_at', now_s)
  if decision == 'approve' then
    local exp = now + tonumber(h.life or '1')
    h.expires_at = exp
    redis.call('HSET', hkey, 'state', 'open', 'appr_state', 'approved', 'expires_at', fmt(exp))
    redis.call('ZADD', P .. ':holds', fmt(exp), hold_id)
    log(P, { 'ts', now_s, 'ev', 'approve', 'agent', h.agent, 'task', h.task, 'svc', h.service,
             'proto', h.protocol, 'amt', h.amount_s, 'hold', hold_id, 'appr', h.appr, 'detail', detail,
             'by', by })
  else
    end_hold(P, hold_id, h, nil, 'voided', 0, now_s, 'approval_denied', detail, nil, nil, by)
  end
  return ok('0')
end

--[[ spendcap_operator_create
KEYS[1] `<ns>:{ops}`
ARGV    1 now_ms  2 id  3 name  4 role  5 tree ('' for every tree)  6 token_sha256  7 by
Reply   ok      error: code (operator_exists | invalid_argument)
--]]
local function operator_create(keys, args)
  local O = keys[1]
  local now, id, name, role, tree, token, by = clock(args[1]), args[2], args[3], args[4], args[5] or '', args[6], args[7] or ''
  if role ~= 'viewer' and role ~= 'operator' and role ~= 'admin' then
    return err('invalid_argument', 'role must be viewer, operator or admin')
  end
  if not name or name == '' or not token or token == '' then return err('invalid_argument', 'name and token are required') end
  if redis.call('HSETNX', O .. ':names', name, id) == 0 then
    return err('operator_exists', 'an operator named ' .. name .. ' exists (or existed)')
  end
  redis.call('HSET', O .. ':o:' .. id, 'name', name, 'role', role, 'tree', tree, 'token', token,
             'created_at', fmt(now), 'created_by', by, 'revoked_at', '')
  log(O, { 'ts', fmt(now), 'ev', 'operator_create', 'operator', name, 'role', role, 'tree', tree, 'by', by })
  return { 'ok' }
end

--[[ spendcap_operator_revoke
KEYS[1] `<ns>:{ops}`
ARGV    1 now_ms  2 name  3 by
Reply   ok: revoked_at already      error: code (unknown_operator)
The token stops at once on every instance: each request reads the operator's record.
--]]
local function operator_revoke(keys, args)
  local O = keys[1]
  local now, name, by = clock(args[1]), args[2], args[3] or ''
  local id = redis.call('HGET', O .. ':names', name)
  if not id then return err('unknown_operator', 'no operator named ' .. tostring(name)) end
  local okey = O .. ':o:' .. id
  local at = redis.call('HGET', okey, 'revoked_at')
  if at and at ~= '' then return { 'ok', 'revoked_at', at, 'already', '1' } end
  redis.call('HSET', okey, 'revoked_at', fmt(now))
  log(O, { 'ts', fmt(now), 'ev', 'operator_revoke', 'operator', name, 'by', by })
  return { 'ok', 'revoked_at', fmt(now), 'already', '0' }
end

redis.register_function('spendcap_hold', hold)
redis.register_function('spendcap_approval_decide', approval_decide)
redis.register_function('spendcap_idem_finish', idem_finish)
redis.register_function('spendcap_settle', settle)
redis.register_function('spendcap_void', void)
redis.register_function('spendcap_note', note)
redis.register_function('spendcap_mark_unknown', mark_unknown)
redis.register_function('spendcap_precheck', precheck)
redis.register_function('spendcap_task_outcome', task_outcome)
redis.register_function('spendcap_create_bucket', create_bucket)
redis.register_function('spendcap_attr_set_once', attr_set_once)
redis.register_function('spendcap_create_agent', create_agent)
redis.register_function('spendcap_set_cap', set_cap)
redis.register_function('spendcap_revoke', revoke)
redis.register_function('spendcap_archive', archive)
redis.register_function('spendcap_rotate_token', rotate_token)
redis.register_function('spendcap_balance', balance)
redis.register_function('spendcap_expire', expire)
redis.register_function('spendcap_receipt_link', receipt_link)
redis.register_function('spendcap_set_controls', set_controls)
redis.register_function('spendcap_set_expiry', set_expiry)
redis.register_function('spendcap_reinstate', reinstate)
redis.register_function('spendcap_create_sub_agent', create_sub_agent)
redis.register_function('spendcap_create_task_token', create_task_token)
redis.register_function('spendcap_revoke_task_token', revoke_task_token)
redis.register_function('spendcap_operator_create', operator_create)
redis.register_function('spendcap_operator_revoke', operator_revoke)

--[[ spendcap_settle_part
KEYS[1] tree prefix
ARGV    1 now_ms  2 agent_id  3 token_sha256|*  4 hold_id  5 amount: the increment (> 0, at most
        what the hold still holds)  6 details JSON for the log line ('' for none)
        7 protocol the hold must have been made under ('' for any)
        8 the hold's settled-so-far total once this increment is in (its idempotency: a retry
        of the same increment names the same total)
Reply   ok:    amount (settled by this call) remaining (still held) part_settled (the hold's
               total so far) replayed (1: this total was already reached; nothing moved)
        error: code (unknown_agent | unauthorized | unknown_hold | hold_expired | hold_voided |
               hold_settled | hold_pending_approval | amount_exceeds_hold |
               hold_protocol_mismatch | part_out_of_order | invalid_argument) detail
Settles part of an open (or `unknown`) hold and keeps it open for the rest: an MPP session's
deposit is held once, and every cumulative voucher the daemon signs settles the difference
since the previous one. `amount` moves from held to spent on the agent, every ancestor, every
bucket and every counter the hold charged (buckets keep counting it as open); the hold's
`amount` becomes what is still held and `psettled` grows by `amount`; one `psettle` log entry
(amt = the increment, rel 0) records it, so that replay moves the same money. Ending the hold
later (spendcap_settle for the last increment, void, expiry) moves only what is still held. An
agent's revocation does not stop it: the increment is for a voucher already sent (a known
charge is always settled); the daemon stops signing new ones.
--]]
local function settle_part(keys, args)
  local P = keys[1]
  local now, agent_id, token, hold_id = clock(args[1]), args[2], args[3], args[4]
  local amount, e = parse_money(args[5], 'amount')
  if not amount then return e end
  if amount == 0 then return err('invalid_argument', 'amount must be greater than 0') end
  local total, e3 = parse_money(args[8], 'total')
  if not total then return e3 end
  local now_s = fmt(now)
  local path, e2 = auth_ending(P, agent_id, token)
  if not path then return e2 end
  expire_due(P, now_s, EXPIRE_BATCH)
  local h = read_hold(P, hold_id)
  if not h or h.agent ~= agent_id then return err('unknown_hold', 'no hold ' .. hold_id) end
  if (args[7] or '') ~= '' and h.protocol ~= args[7] then
    return err('hold_protocol_mismatch', 'hold ' .. hold_id .. ' is a ' .. h.protocol .. ' payment')
  end
  local before = tonumber(h.psettled or '0')
  if total <= before then
    return { 'ok', 'amount', fmt(amount), 'remaining', h.amount_s, 'part_settled', fmt(before), 'replayed', '1' }
  end
  if h.state == 'open' and h.expires_at <= now then
    end_hold(P, hold_id, h, path, 'expired', 0, now_s, 'hold_expired', '')
    h.state = 'expired'
  end
  lapse_approval(P, hold_id, h, now)
  if h.state == 'pending_approval' then
    return err('hold_pending_approval', 'hold ' .. hold_id .. ' waits for approval')
  end
  if h.state ~= 'open' and h.state ~= 'unknown' then return err('hold_' .. h.state, 'hold is ' .. h.state) end
  if before + amount ~= total then
    return err('part_out_of_order', 'the hold has settled ' .. fmt(before) .. ', so an increment of ' ..
               fmt(amount) .. ' does not reach ' .. fmt(total))
  end
  if amount > h.amount then
    return err('amount_exceeds_hold', 'settle amount ' .. fmt(amount) .. ' exceeds held ' .. fmt(h.amount))
  end
  for _, id in ipairs(split_path(path)) do
    local akey = P .. ':a:' .. id
    redis.call('HINCRBY', akey, 'held', -amount)
    redis.call('HINCRBY', akey, 'spent', amount)
  end
  for _, id in ipairs(split_path(h.buckets)) do
    local bkey = P .. ':b:' .. id
    redis.call('HINCRBY', bkey, 'held', -amount)
    redis.call('HINCRBY', bkey, 'spent', amount)
  end
  for _, id in ipairs(split_path(h.ctrs)) do
    local ckey = P .. ':' .. id
    redis.call('HINCRBY', ckey, 'held', -amount)
    redis.call('HINCRBY', ckey, 'spent', amount)
  end
  local remaining_s = fmt(h.amount - amount)
  redis.call('HSET', P .. ':h:' .. hold_id, 'amount', remaining_s, 'psettled', fmt(total))
  log(P, { 'ts', now_s, 'ev', 'psettle', 'agent', h.agent, 'task', h.task, 'svc', h.service,
           'proto', h.protocol, 'amt', fmt(amount), 'rel', '0', 'hold', hold_id, 'detail', args[6] or '' })
  return { 'ok', 'amount', fmt(amount), 'remaining', remaining_s, 'part_settled', fmt(total), 'replayed', '0' }
end

redis.register_function('spendcap_settle_part', settle_part)
