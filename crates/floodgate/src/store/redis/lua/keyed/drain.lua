-- Keyed limiters: the keyed script, the plain script's shared parts (common.lua, state.lua and
-- the operations that need no change) plus these files. A keyed limiter's total is the plain
-- limiter state (meta, hot, holders, leases, waits, outcomes: grants, leases, fencing tokens,
-- extend, release, retry hints are the plain ones); its waiters queue per key in `kqueue`
-- instead of `queue`, and freed capacity goes to the keys in deficit round robin, as
-- crates/floodgate/src/core/keyed/ (read its mod.rs for the rules). Its own keys, after the
-- eleven of common.lua, all under the limiter's hash tag:
--   12 kstate (hash KEY -> 'gen|in_use|holders|waiting|queued_permits|deficit|turn|in_ring|
--      limit|weight|load': a key's state while it has holders or waiters; HLEN = key count)
--   13 koverrides (hash KEY -> 'concurrency|weight', PUT .../keys/{key})
--   14 kqueue (zset, every score 0, ordered by member: KEY \1 %016d(seq) \1 queue member (see
--      member()), so a key's head is the first member of its range: O(log n))
--   15 kring (list 'gen \1 KEY': keys whose head only the total holds back, in round-robin
--      order; removal is lazy, an entry of an older generation of a key is skipped)
--   16 kholders (hash token -> KEY: whose share a grant's release or lapse frees; and
--      'r:ID' -> KEY: which key holds schedule reservation ID, for unschedule)
--   17 kbusy (zset KEY by holders + waiters: the status's busiest keys)
--   18 ksleep (zset '%016d(gen) \1 at \1 KEY' by `at`, when its own rate lets its head run: keys held
--      back only by their rate, woken then; one entry per arming, stale ones skipped)
--   19 kidle (zset '%016d(gen) \1 KEY' by when its rate debt ends: keys whose only state is that
--      debt, dropped then)
--   20 kheads (zset KEY by its head waiter's enqueued_at: every key with waiters, so the oldest
--      wait across keys is its first entry, O(log keys); kept where a key's head changes,
--      layer.lua KD.head_moved; read by holders.lua)
-- Keys contain no control character (check_key), so \1 separates them from what follows.
-- Every waiter of a keyed limiter is in `waits` (its deadline), and its `k:WAITER` entry in
-- `holders` is 'W|seq|KEY \1 queue member'.

local K_KS, K_KO, K_KQ, K_RING, K_KH, K_BUSY = KEYS[12], KEYS[13], KEYS[14], KEYS[15], KEYS[16], KEYS[17]
local SEP = '\1'

-- Answers the queue of a deleted keyed limiter, a batch per call, like the plain drain.
local function kdrain()
  local batch = redis.call('ZPOPMIN', K_DEAD, 500)
  for i = 1, #batch, 2 do
    local mem = batch[i]
    local s = string.find(mem, SEP, 1, true)
    local w = parse_member(string.sub(mem, s + 18))
    redis.call('PUBLISH', w.channel, name .. '\n' .. w.key .. '\nD')
  end
  return redis.call('ZCARD', K_DEAD)
end
if op == 'drain' then return {'drained', fmt(kdrain()), '-1'} end

