-- Fast paths: the common operations in a handful of commands, reading and writing only `hot`
-- (plus what the operation itself adds or removes), when no deadline is due (`due` above the
-- clock). The general path below loads and rewrites the whole state and applies every rule;
-- anything these paths do not cover (a refusal, a rate with a queue, a lease due...) falls
-- through to it. The same rules, checked against the core by tests/twin.rs on both paths.
--   concurrency ('1'): an acquire granted at once, an acquire queued behind others, a release
--     (granting the queue's head waiters it frees room for);
--   rate only ('r'): a release with nobody queued and nothing held (its acquires: paced.lua).
-- A repeated idempotent acquire (its key already has an entry) takes the general path.

-- MEMBER_PAT without the wait deadline's capture (a grant does not read it; each capture is a
-- string made and interned).
local GRANT_PAT = '^([^|]*)|([^|]*)|([^|]*)|[^|]*|([^|]*)|([^|]*)|([^|]*)|(.*)$'
if (op == 'acquire' or op == 'release') and not general_only and not is_repeat then
  -- A release reads its holder's record in the same command (is_token: anything else is held
  -- by nobody, and a `k:` or `hot` field must never be taken for a record).
  -- Its lease slot too (`l:TOKEN`, absent when the holder is its own slot: common.lua's header).
  -- (An acquire's `hot` was read in paced.lua.)
  local held_raw, held_slot, l_field
  if op == 'release' and is_token(ARGV[4]) then
    l_field = 'l:' .. ARGV[4]
    local r = redis.call('HMGET', K_HOLD, HOT_FIELD, ARGV[4], l_field)
    raw_hot, held_raw, held_slot = r[1], r[2], r[3]
  elseif op == 'release' then
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
  if due > now and (mode == '1' or (mode == 'r' and op == 'release' and qlen == 0 and in_use == 0)) then
    local refresh = ttl_at <= now
    if refresh then ttl_at = now + TTL_REFRESH end
    -- Keys that were empty (so gone) get their TTL when they come back, unless save_hot()
    -- refreshes every key (`if not refresh then PEXPIRE` below; written out, not a closure
    -- over `refresh`, which each call would make).
    if op == 'acquire' then
      local permits, lease = tonumber(ARGV[4]), lease_us
      if ARGV[5] ~= '' then lease = tonumber(ARGV[5]) end
      local key = ARGV[7]
      if permits >= 1 and permits <= cap and lease >= MIN_LEASE
        and lease <= MAX_LEASE and mode == '1' then
        if qlen == 0 and in_use + permits <= limit then
          local token = math.max(next_token, now)
          local deadline = now + lease
          -- (The token is usually the clock itself, and one permit the usual count: each
          -- string formatted once, or not at all.)
          local now_s, deadline_s = fmt(now), fmt(deadline)
          local t_s = token == now and now_s or fmt(token)
          local p_s = permits == 1 and '1' or fmt(permits)
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
          if in_use == 0 and not refresh then redis.call('PEXPIRE', K_LEASE, ARGV[3]) end
          in_use, next_token = in_use + permits, token + 1
          c_granted = c_granted + 1
          due = math.min(due, deadline)
          save_hot(refresh, fields, #fields, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
            c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue, heavy, tat, rate_t,
            rate_burst, c_paced, c_timed_out, max_dl)
          return {'granted', t_s, p_s, lease, deadline_s, now_s, '0', delay(due)}
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
            -- It may have been empty; rare enough to ask every time.
            if not refresh then redis.call('PEXPIRE', K_WAITS, ARGV[3]) end
          else
            max_dl = deadline
          end
          if qlen == 0 and not refresh then redis.call('PEXPIRE', K_Q, ARGV[3]) end
          if permits > 1 then
            redis.call('ZADD', K_HEAVY, seq_s, mem)
            if heavy == 0 and not refresh then redis.call('PEXPIRE', K_HEAVY, ARGV[3]) end
            heavy = heavy + 1
          end
          qlen = qlen + 1
          next_seq, queued_permits = seq + 1, queued_permits + permits
          due = math.min(due, deadline)
          save_hot(refresh, fields, #fields, mode, qlen, in_use, limit, next_token, lease_us, cap, ttl_at, c_granted,
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
      -- (Each field name made once: every string a script makes is hashed and interned.)
      if wkey ~= '' then
        local k_field = 'k:' .. wkey
        if idem(wkey) then
          redis.call('HDEL', K_HOLD, token, k_field, 'a:' .. wkey, held_slot and l_field or k_field,
            slot_field or k_field)
        elseif held_slot then
          redis.call('HDEL', K_HOLD, token, k_field, l_field, slot_field or k_field)
        else
          redis.call('HDEL', K_HOLD, token, k_field)
        end
      elseif held_slot then
        redis.call('HDEL', K_HOLD, token, l_field, slot_field or token)
      else
        redis.call('HDEL', K_HOLD, token)
      end
      in_use = math.max(0, in_use - permits)
      c_released = c_released + 1
      -- The freed room goes to the head of the queue (strict FIFO: a head that does not fit
      -- holds back those behind it). With no heavy waiter, every waiter fits in one permit.
      local now_s
      -- The first grant answered in the reply (`wk1`, `out1`), and any more (`more`, rare).
      local wk1, out1, more
      -- The grants' holder records and outcomes, written with the hot value by save_hot: the
      -- first `n` entries of `fields`, made with room for one grant's eight (so it never grows
      -- in the usual case), or nil when nobody is queued.
      local fields, n = nil, 0
      if qlen > 0 then fields = {false, false, false, false, false, false, false, false} end
      while qlen > 0 and in_use < limit do
        local head
        if heavy > 0 then
          head = redis.call('ZRANGE', K_Q, 0, 0, 'WITHSCORES')
        else
          head = redis.call('ZPOPMIN', K_Q)
        end
        local mem = head[1]
        -- `hot` counts waiters `queue` does not have: the queue was lost (state.lua's check):
        -- a whole loss, as the general path makes it (this call's writes go with it).
        if not mem then
          redis.call('DEL', K_META)
          return {'unknown', '-1'}
        end
        -- (The wait deadline, its fourth field, is not captured: a grant does not need it.)
        local wk, p_s, l_s, e, w, ch, label = string.match(mem, GRANT_PAT)
        if not wk then
          local f = split(mem)
          wk, p_s, l_s, e, w, ch, label = f[1], f[2], f[3], f[5], f[6], f[7], tail(mem, 7)
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
        -- Each number formatted once (string.format is a large part of a script's time); the
        -- token is usually the clock itself (tokens run ahead of it only when grants come
        -- faster than one a microsecond).
        local t_s = t == now and now_s or fmt(t)
        local deadline_s = fmt(deadline)
        local outcome = 'G|' .. t_s .. '|' .. p_s .. '|' .. l_s .. '|' ..
          deadline_s .. '|' .. now_s .. '|' .. fmt(math.max(0, now - tonumber(e)))
        -- The holder's record and the waiter's outcome (replacing its queue entry), in one write.
        fields[n + 1], fields[n + 2] = t_s, p_s .. '|' .. deadline_s .. '|' .. now_s ..
          '|' .. wk .. '|' .. label
        fields[n + 3], fields[n + 4] = 'k:' .. wk, outcome
        n = n + 4
        -- (A release of many permits may grant many waiters: written in batches that unpack()
        -- can pass, the last with the hot value.)
        if n >= 4000 then
          redis.call('HSET', K_HOLD, unpack(fields, 1, n))
          n = 0
        end
        if free_slot then
          -- The slot's member is still in `leases` (so the key too): its deadline moves. Added
          -- instead, it was not there: `leases` was lost (a whole loss, as above).
          if redis.call('ZADD', K_LEASE, deadline_s, free_slot) == 1 then
            redis.call('DEL', K_META)
            return {'unknown', '-1'}
          end
          fields[n + 1], fields[n + 2] = 'l:' .. t_s, free_slot
          fields[n + 3], fields[n + 4] = 's:' .. free_slot, t_s
          n = n + 4
          free_slot = nil
        else
          redis.call('ZADD', K_LEASE, deadline_s, t_s)
          if in_use == 0 and not refresh then redis.call('PEXPIRE', K_LEASE, ARGV[3]) end
        end
        in_use, next_token, qlen = in_use + wp, t + 1, qlen - 1
        queued_permits = queued_permits - wp
        c_granted = c_granted + 1
        due = math.min(due, deadline)
        if ch == local_ch then
          if not wk1 then
            wk1, out1 = wk, outcome
          else
            more = more or {}
            more[#more + 1], more[#more + 2] = wk, outcome
          end
        else
          redis.call('PUBLISH', ch, name .. '\n' .. wk .. '\n' .. outcome)
        end
      end
      if free_slot then
        -- A held lease slot missing from `leases`: `leases` was lost (a whole loss, as above).
        if redis.call('ZREM', K_LEASE, free_slot) == 0 then
          redis.call('DEL', K_META)
          return {'unknown', '-1'}
        end
        -- (Only if the queue was not as `qlen` said: its `s:` field was left for a grant.)
        if held_slot and not slot_field then redis.call('HDEL', K_HOLD, 's:' .. held_slot) end
      end
      save_hot(refresh, n > 0 and fields or nil, n, mode, qlen, in_use, limit, next_token, lease_us, cap,
        ttl_at, c_granted, c_released, ewma, next_seq, queued_permits, due, max_wait, max_queue,
        heavy, tat, rate_t, rate_burst, c_paced, c_timed_out, max_dl)
      -- The reply: built in one constructor when at most one grant is answered in it.
      if not wk1 then return {'released', '1', delay(due)} end
      if not more then return {'released', '1', wk1, out1, delay(due)} end
      local reply = {'released', '1', wk1, out1}
      for i = 1, #more do reply[#reply + 1] = more[i] end
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

