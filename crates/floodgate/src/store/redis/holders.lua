-- Read-only: who holds a limiter's permits (bounded) and a summary of its queue, for the
-- dashboard and GET /v1/limiters/{name}/holders. Changes nothing (no advance: a lease past its
-- deadline is simply not listed), so it may run on any server at any time.
--
-- KEYS: 1 meta  2 holders  3 leases  4 queue  5 hot (the same keys as the limiter script, lua/common.lua)
--       6 kqueue (a keyed limiter's waiters, every key's; lua/keyed/drain.lua)
--       7 kheads (a keyed limiter's keys with waiters by their head's enqueued_at)
-- ARGV: 1 how many holders to list at most
-- Reply: 'holders', now, live holders in total, waiting, waiting permits, oldest waiter's
-- enqueued_at ('' if none; a keyed limiter's: the oldest of its keys' heads, from kheads),
-- rate tokens available ('' without a rate), then per holder (lease ending soonest first):
-- token, permits, lease deadline, granted_at, label. Or 'unknown'.

local K_META, K_HOLD, K_LEASE, K_Q, K_HOT, K_KQ = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local K_KHEADS = KEYS[7]
local limit = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(n) return string.format('%d', n) end

if redis.call('HEXISTS', K_META, 'max_queue') == 0 then return {'unknown'} end

-- Fields are `|`-separated; the label is everything after the fourth `|` (it may hold `|`).
local function fields(raw, n)
  local out, start = {}, 1
  for _ = 1, n do
    local i = string.find(raw, '|', start, true)
    if not i then
      out[#out + 1] = string.sub(raw, start)
      return out, ''
    end
    out[#out + 1] = string.sub(raw, start, i - 1)
    start = i + 1
  end
  return out, string.sub(raw, start)
end

local live = '(' .. fmt(now)
local oldest = ''
-- The head's queue member carries its record: key|permits|lease|deadline|enqueued_at|...
local head = redis.call('ZRANGE', K_Q, 0, 0)
if head[1] then oldest = fields(head[1], 5)[5] or '' end
-- A keyed limiter's waiters queue per key: the oldest is the first of its keys' heads.
local kh = redis.call('ZRANGE', K_KHEADS, 0, 0, 'WITHSCORES')
if kh[2] and (oldest == '' or tonumber(kh[2]) < tonumber(oldest)) then oldest = fmt(tonumber(kh[2])) end
-- The hot value's fields (the limiter script's HOT order, lua/state.lua): 13 queued_permits, 18 tat.
-- Packed as HOT_FMT in lua/common.lua (its second byte the tag `#`; in the unpacked values field
-- i > 1 is at i + 1, after the tag), or text, `|`-separated, as an older release wrote it.
-- A field of `holders`; an older release kept it in its own key (5).
local raw_hot = redis.call('HGET', K_HOLD, 'hot') or redis.call('GET', K_HOT) or ''
local hot
if string.byte(raw_hot, 2) == 35 then
  local v = {struct.unpack('<c1c1dddddddddddddddddddddd', raw_hot)}
  hot = {[13] = fmt(v[14]), [18] = fmt(v[19])}
else
  hot = fields(raw_hot, 22)
end
local reply = {'holders', fmt(now), fmt(redis.call('ZCOUNT', K_LEASE, live, '+inf')),
               fmt(redis.call('ZCARD', K_Q) + redis.call('ZCARD', K_KQ)), hot[13] or '0', oldest, ''}
local rate_limit = tonumber(redis.call('HGET', K_META, 'rate_limit') or '')
if rate_limit then
  -- GCRA, as the limiter script: the emission interval and the burst's allowance against the debt.
  local r = redis.call('HMGET', K_META, 'rate_period_us', 'rate_burst')
  local t = math.max(1, math.ceil(tonumber(r[1]) / rate_limit))
  local debt = math.max(0, tonumber(hot[18] or '0') - now)
  reply[7] = string.format('%.3f', math.max(0, (t * tonumber(r[2]) - debt) / t))
end
if limit > 0 then
  local tokens = redis.call('ZRANGEBYSCORE', K_LEASE, live, '+inf', 'LIMIT', 0, limit)
  for _, slot in ipairs(tokens) do
    -- A member of `leases` is a lease slot: its holder is `s:SLOT`, or the slot itself.
    local token = redis.call('HGET', K_HOLD, 's:' .. slot) or slot
    local raw = redis.call('HGET', K_HOLD, token)
    if raw then
      local f, label = fields(raw, 4)
      reply[#reply + 1] = token
      reply[#reply + 1] = f[1] or '0'
      reply[#reply + 1] = f[2] or '0'
      reply[#reply + 1] = f[3] or '0'
      reply[#reply + 1] = label
    end
  end
end
return reply
