-- Fast paths: the common operations in a handful of commands, reading and writing only `hot`
-- (plus what the operation itself adds or removes), when no deadline is due (`due` above the
-- clock). The general path below loads and rewrites the whole state and applies every rule;
-- anything these paths do not cover (a refusal, a rate with a queue, a lease due...) falls
-- through to it. The same rules, checked against the core by tests/twin.rs on both paths.
--   concurrency ('1'): an acquire granted at once, an acquire queued behind others, a release
--     (granting the queue's head waiters it frees room for);
--   rate only ('r'): an acquire the rate grants at once, or refuses when it cannot wait; a
--     release with nobody queued and nothing held.
-- A repeated idempotent acquire (its key already has an entry) takes the general path.
-- Writes back the hot value (the fields in HOT order after the tag), in the one HSET of
-- `holders` that also writes `fields` (the operation's own field/value pairs, or nil), and, when
-- due, refreshes every key's TTL. The fields are parameters, not upvalues: a closure over the
-- fast path's 24 locals costs each call about 0.8 us of Redis time to make (an upvalue object
-- per local).
local function save_hot(refresh, fields, mode, ...)
  fields = fields or {}
  fields[#fields + 1] = HOT_FIELD
  fields[#fields + 1] = struct.pack(HOT_FMT, mode, HOT_TAG, ...)
  redis.call('HSET', K_HOLD, unpack(fields))
  if refresh then
    for i = 1, 9 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
  end
end
-- The delay to report from the fast paths' `due` (a lower bound of the next deadline).
local function delay(due)
  if due >= NONE then return '-1' end
  return fmt(due - now)
end
local is_repeat = op == 'acquire' and idem(ARGV[7])
  and redis.call('HEXISTS', K_HOLD, 'k:' .. ARGV[7]) == 1
if (op == 'acquire' or op == 'release') and not general_only and not is_repeat then
  -- A release reads its holder's record in the same command (is_token: anything else is held
  -- by nobody, and a `k:` or `hot` field must never be taken for a record).
  -- Its lease slot too (`l:TOKEN`, absent when the holder is its own slot: common.lua).
  local raw_hot, held_raw, held_slot
  if op == 'release' and is_token(ARGV[4]) then
    local r = redis.call('HMGET', K_HOLD, HOT_FIELD, ARGV[4], 'l:' .. ARGV[4])
    raw_hot, held_raw, held_slot = r[1], r[2], r[3]
  else
    raw_hot = redis.call('HGET', K_HOLD, HOT_FIELD)
  end
  -- HOT's 23 fields unpacked by the C `struct` library straight into numbers (HOT_FMT, in
  -- common.lua): no string is made per field, no strtod. No value, or one an older release
  -- wrote (text, `|`-separated: its second byte is `|`), unpacks as fast = '0' here: the general
  -- path runs, and rewrites it packed.
  if not (raw_hot and string.byte(raw_hot, 2) == HOT_TAG_BYTE) then
    raw_hot = '0' .. HOT_TAG .. string.rep('\0', 176)
  end
  local mode, _, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted, c_released,
    ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t, rate_burst,
    c_paced, c_timed_out, max_dl = struct.unpack(HOT_FMT, raw_hot)
  if due > now and (mode == '1' or (mode == 'r' and (op == 'acquire' or (qlen == 0 and in_use == 0)))) then
    local refresh = ttl_at <= now
    if refresh then ttl_at = now + TTL_REFRESH end
    -- Keys that were empty (so gone) get their TTL when they come back.
    local function created(key)
      if not refresh then redis.call('PEXPIRE', key, ARGV[3]) end   -- save_hot() refreshes every key
    end
    if op == 'acquire' then
      local permits, lease = tonumber(ARGV[4]), lease_us
      if ARGV[5] ~= '' then lease = tonumber(ARGV[5]) end
      local key = ARGV[7]
      if permits >= 1 and permits <= cap and lease >= MIN_LEASE and lease <= MAX_LEASE
        and qlen == 0 and mode == 'r' then
        -- GCRA (as rate_at/take_rate below): granted at once, or refused if it cannot wait.
        local t = rate_t
        local ra = math.max(0, tat + t * permits - t * rate_burst)
        if ra <= now then
          local token = math.max(next_token, now)
          next_token = token + 1
          tat = math.max(tat, now) + t * permits
          c_granted, c_paced = c_granted + 1, c_paced + 1
          save_hot(refresh, nil, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
            c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t,
            rate_burst, c_paced, c_timed_out, max_dl)
          local now_s = fmt(now)
          return {'granted', fmt(token), fmt(permits), '0', now_s, now_s, '0', delay(due)}
        end
        local wait = max_wait
        if ARGV[6] ~= '' then wait = math.min(tonumber(ARGV[6]), wait) end
        if ra - now > wait then
          c_timed_out = c_timed_out + 1
          save_hot(refresh, nil, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
            c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t,
            rate_burst, c_paced, c_timed_out, max_dl)
          return {'timeout', fmt(math.max(ra - now, 1000)), delay(due)}
        end
      elseif permits >= 1 and permits <= cap and lease >= MIN_LEASE
        and lease <= MAX_LEASE and mode == '1' then
        if qlen == 0 and in_use + permits <= limit then
          local token = math.max(next_token, now)
          local deadline = now + lease
          local t_s, p_s, deadline_s, now_s = fmt(token), fmt(permits), fmt(deadline), fmt(now)
          local rec = p_s .. '|' .. deadline_s .. '|' .. now_s .. '|' .. key .. '|' .. (ARGV[9] or '')
          -- The waiter key rides along, and indexes the grant (`k:KEY`), so a caller that lost
          -- this reply can still find and return it (cancel, below).
          -- (Written with the hot value, by save_hot.)
          local fields
          if idem(key) then
            fields = {t_s, rec, 'k:' .. key, 'I|' .. t_s, 'a:' .. key, ARGV[10] or ''}
          elseif key ~= '' then
            fields = {t_s, rec, 'k:' .. key, 'I|' .. t_s}
          else
            fields = {t_s, rec}
          end
          redis.call('ZADD', K_LEASE, deadline_s, t_s)
          if in_use == 0 then created(K_LEASE) end
          in_use, next_token = in_use + permits, token + 1
          c_granted = c_granted + 1
          due = math.min(due, deadline)
          save_hot(refresh, fields, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
            c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t,
            rate_burst, c_paced, c_timed_out, max_dl)
          return {'granted', t_s, p_s, fmt(lease), deadline_s, now_s, '0', delay(due)}
        end
        local wait = max_wait
        if ARGV[6] ~= '' then wait = math.min(tonumber(ARGV[6]), wait) end
        if wait >= 1 and qlen < max_queue then
          -- Queued behind others (or behind a full limit): three writes.
          local seq, deadline = next_seq, now + wait
          local seq_s = fmt(seq)
          local in_waits = deadline < (qlen == 0 and 0 or max_dl)
          local mem = member(key, permits, lease, deadline, now, in_waits, ARGV[8], ARGV[9])
          -- The entry is written with the hot value, by save_hot (`holders` holds `hot`, so it
          -- exists already and keeps its TTL).
          local fields
          if idem(key) then
            fields = {'k:' .. key, 'W|' .. seq_s .. '|' .. mem, 'a:' .. key, ARGV[10] or ''}
          else
            fields = {'k:' .. key, 'W|' .. seq_s .. '|' .. mem}
          end
          redis.call('ZADD', K_Q, seq_s, mem)
          -- (A TTL is set after the write that creates the key.)
          if in_waits then
            redis.call('ZADD', K_WAITS, fmt(deadline), wait_member(seq, key))
            created(K_WAITS)   -- it may have been empty; rare enough to ask every time
          else
            max_dl = deadline
          end
          if qlen == 0 then created(K_Q) end
          if permits > 1 then
            redis.call('ZADD', K_HEAVY, seq_s, mem)
            if heavy == 0 then created(K_HEAVY) end
            heavy = heavy + 1
          end
          qlen = qlen + 1
          next_seq, queued_permits = seq + 1, queued_permits + permits
          due = math.min(due, deadline)
          save_hot(refresh, fields, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
            c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t,
            rate_burst, c_paced, c_timed_out, max_dl)
          return {'queued', fmt(wait), delay(due)}
        end
      end
    elseif mode == 'r' then
      -- Rate only, nothing held (holders of a concurrency limit it had before may be) and
      -- nobody queued: nothing to release (a dropped permit still sends its release).
      return {'released', '0', delay(due)}
    else
      local token = ARGV[4]
      local raw = held_raw
      if not raw then return {'released', '0', delay(due)} end
      -- permits|deadline|granted_at|waiter_key|label: permits, granted_at and the waiter key
      -- are all a release needs.
      local p, granted_at, wkey = string.match(raw, '^([^|]*)|[^|]*|([^|]*)|([^|]*)')
      if not p then
        local f = split(raw)
        p, granted_at, wkey = f[1], f[3], f[4] or ''
      end
      local permits = tonumber(p)
      -- Never negative, even if the clock stepped back (a failover to a replica behind).
      local held = math.max(0, now - tonumber(granted_at))
      ewma = next_ewma(ewma >= 0 and ewma or nil, held)
      -- Its lease slot: handed to the first waiter granted below (one ZADD moves its deadline),
      -- else removed from `leases` after them. Its `s:` field is left for the new holder's
      -- HSET to overwrite when a waiter is certainly granted (one permit fits whoever heads a
      -- queue with no heavy waiter).
      local free_slot = held_slot or token
      local slot_field = nil
      if held_slot and not (qlen > 0 and heavy == 0 and in_use - permits < limit) then
        slot_field = 's:' .. held_slot
      end
      if idem(wkey) then
        redis.call('HDEL', K_HOLD, token, 'k:' .. wkey, 'a:' .. wkey, held_slot and 'l:' .. token or 'k:' .. wkey,
          slot_field or 'k:' .. wkey)
      elseif wkey ~= '' then
        if held_slot then
          redis.call('HDEL', K_HOLD, token, 'k:' .. wkey, 'l:' .. token, slot_field or 'k:' .. wkey)
        else
          redis.call('HDEL', K_HOLD, token, 'k:' .. wkey)
        end
      elseif held_slot then
        redis.call('HDEL', K_HOLD, token, 'l:' .. token, slot_field or token)
      else
        redis.call('HDEL', K_HOLD, token)
      end
      in_use = math.max(0, in_use - permits)
      c_released = c_released + 1
      -- The freed room goes to the head of the queue (strict FIFO: a head that does not fit
      -- holds back those behind it). With no heavy waiter, every waiter fits in one permit.
      local now_s
      local reply = {'released', '1'}
      -- The grants' holder records and outcomes, written with the hot value by save_hot.
      local fields = {}
      while qlen > 0 and in_use < limit do
        local head
        if heavy > 0 then
          head = redis.call('ZRANGE', K_Q, 0, 0, 'WITHSCORES')
        else
          head = redis.call('ZPOPMIN', K_Q)
        end
        local mem = head[1]
        if not mem then break end
        local wk, p_s, l_s, d, e, w, ch, label = string.match(mem, MEMBER_PAT)
        if not wk then
          local f = split(mem)
          wk, p_s, l_s, d, e, w, ch, label = f[1], f[2], f[3], f[4], f[5], f[6], f[7], tail(mem, 7)
        end
        local wp = tonumber(p_s)
        if heavy > 0 then
          if in_use + wp > limit then break end
          redis.call('ZREM', K_Q, mem)
        end
        if w == 'w' then redis.call('ZREM', K_WAITS, wait_member(tonumber(head[2]), wk)) end
        if wp > 1 then
          redis.call('ZREM', K_HEAVY, mem)
          heavy = heavy - 1
        end
        local t = math.max(next_token, now)
        local deadline = now + tonumber(l_s)
        now_s = now_s or fmt(now)
        -- Each number formatted once (string.format is a large part of a script's time).
        local t_s, deadline_s = fmt(t), fmt(deadline)
        local outcome = 'G|' .. t_s .. '|' .. p_s .. '|' .. l_s .. '|' ..
          deadline_s .. '|' .. now_s .. '|' .. fmt(math.max(0, now - tonumber(e)))
        -- The holder's record and the waiter's outcome (replacing its queue entry), in one write.
        fields[#fields + 1], fields[#fields + 2] = t_s, p_s .. '|' .. deadline_s .. '|' .. now_s ..
          '|' .. wk .. '|' .. label
        fields[#fields + 1], fields[#fields + 2] = 'k:' .. wk, outcome
        -- (A release of many permits may grant many waiters: written in batches that unpack()
        -- can pass, the last with the hot value.)
        if #fields >= 4000 then
          redis.call('HSET', K_HOLD, unpack(fields))
          fields = {}
        end
        if free_slot then
          -- The slot's member is still in `leases` (so the key too): its deadline moves.
          redis.call('ZADD', K_LEASE, deadline_s, free_slot)
          fields[#fields + 1], fields[#fields + 2] = 'l:' .. t_s, free_slot
          fields[#fields + 1], fields[#fields + 2] = 's:' .. free_slot, t_s
          free_slot = nil
        else
          redis.call('ZADD', K_LEASE, deadline_s, t_s)
          if in_use == 0 then created(K_LEASE) end
        end
        in_use, next_token, qlen = in_use + wp, t + 1, qlen - 1
        queued_permits = queued_permits - wp
        c_granted = c_granted + 1
        due = math.min(due, deadline)
        if ch == local_ch then
          reply[#reply + 1], reply[#reply + 2] = wk, outcome
        else
          redis.call('PUBLISH', ch, name .. '\n' .. wk .. '\n' .. outcome)
        end
      end
      if free_slot then
        redis.call('ZREM', K_LEASE, free_slot)
        -- (Only if the queue was not as `qlen` said: its `s:` field was left for a grant.)
        if held_slot and not slot_field then redis.call('HDEL', K_HOLD, 's:' .. held_slot) end
      end
      save_hot(refresh, fields, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
        c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t,
        rate_burst, c_paced, c_timed_out, max_dl)
      reply[#reply + 1] = delay(due)
      return reply
    end
  end
end

-- Answers the queue of a deleted limiter, a batch per call (so no call blocks Redis for long):
-- each waiter is told `D`. Replies the number still to answer.
local DRAIN_BATCH = 500
local function drain()
  local batch = redis.call('ZPOPMIN', K_DEAD, DRAIN_BATCH)
  for i = 1, #batch, 2 do
    local w = parse_member(batch[i])
    redis.call('PUBLISH', w.channel, name .. '\n' .. w.key .. '\nD')
  end
  return redis.call('ZCARD', K_DEAD)
end
if op == 'drain' then return {'drained', fmt(drain()), '-1'} end

