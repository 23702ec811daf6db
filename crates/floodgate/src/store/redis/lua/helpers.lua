-- Helpers of the paths that queue and grant waiters (fast.lua, the general path): made after
-- the rate-only fast path (paced.lua), which needs none of them, so its calls make none of
-- these closures.

-- The smoothed hold time after a hold of `held` (weight 1/8, integer steps: the same
-- arithmetic as the core's observe_hold).
local function next_ewma(ewma, held)
  if not ewma then return held end
  if held >= ewma then return ewma + math.floor((held - ewma) / HOLD_EWMA_WEIGHT) end
  return ewma - math.floor((ewma - held) / HOLD_EWMA_WEIGHT)
end

-- What follows the n-th `|` of s ('' if none): the free-form label ending a record.
local function tail(s, n)
  local at = 0
  for _ = 1, n do
    at = string.find(s, '|', at + 1, true)
    if not at then return '' end
  end
  return string.sub(s, at + 1)
end

-- `sep`: the separator, '|' unless given (a keyed reservation's fields are split on ',').
local function split(s, sep)
  local out, start = {}, 1
  while true do
    local i = string.find(s, sep or '|', start, true)
    if not i then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- A queued waiter's member of `queue`: everything its grant needs, so taking the head needs
-- no other read. The key comes first (unique) and never contains `|`; the label comes last.
-- `in_waits`: whether the waiter is in `waits`. A waiter whose deadline is no earlier than
-- that of any waiter queued before it (`max_dl` in hot, the latest deadline enqueued since the
-- queue was last empty: the usual case, where waiters share a wait) is not: while it is queued
-- its deadline cannot be the first to come unless it is the head. So the earliest wait
-- deadline is the first of `waits` or the head's (first_wait below), and such a waiter costs
-- no `waits` write on enqueue nor on grant.
-- (One permit, the usual case, is written as the constant '1': no number formatted.)
local function member(key, permits, lease, deadline, enqueued_at, in_waits, channel, label)
  return key .. '|' .. (permits == 1 and '1' or fmt(permits)) .. '|' .. fmt(lease) .. '|' .. fmt(deadline) .. '|' ..
    fmt(enqueued_at) .. '|' .. (in_waits and 'w' or 'm') .. '|' .. channel .. '|' .. (label or '')
end

-- One pattern match takes a member apart (a loop of string.find and string.sub calls cost the
-- release several microseconds of Redis time); the label is the rest, `|` and all.
local MEMBER_PAT = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$'

local function parse_member(mem, seq)
  local key, p, l, d, e, w, ch, label = string.match(mem, MEMBER_PAT)
  if not key then
    -- Not written by member() (fewer fields): read it field by field, as before.
    local f = split(mem)
    key, p, l, d, e, w, ch, label = f[1], f[2], f[3], f[4], f[5], f[6], f[7], tail(mem, 7)
  end
  -- (`permits_s`, `lease_s`: the fields as written, so a grant need not format them again.)
  return {key = key, permits = tonumber(p), lease = tonumber(l), deadline = tonumber(d),
          enqueued_at = tonumber(e), in_waits = w == 'w', channel = ch,
          label = label, member = mem, seq = seq, permits_s = p, lease_s = l}
end

-- The waits member of waiter `key` with arrival sequence `seq`.
local function wait_member(seq, key) return string.format('%016d', seq) .. key end

-- A release's token is a number; anything else (a `k:` field above all) is held by nobody.
local function is_token(t) return string.find(t, '^%d+$') ~= nil end
