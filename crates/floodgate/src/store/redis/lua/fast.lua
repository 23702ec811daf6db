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
-- The 23 fields of HOT (state.lua), `|`-separated: a literal, so no call builds it.
local HOT_PAT =
  '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$'
local is_repeat = op == 'acquire' and idem(ARGV[7])
  and redis.call('HEXISTS', K_HOLD, 'k:' .. ARGV[7]) == 1
if (op == 'acquire' or op == 'release') and not general_only and not is_repeat then
  local raw_hot = redis.call('GET', K_HOT)
  -- The 23 fields of HOT (state.lua) in one pattern match, the largest single cost of a fast
  -- path's Lua work when done field by field; a value of another length is split as before.
  local h = {}
  if raw_hot then
    h = {string.match(raw_hot, HOT_PAT)}
    if not h[1] then h = split(raw_hot) end
  end
  local due = tonumber(h[14] or '')
  local mode = h[1]
  if due and due > now and (mode == '1' or (mode == 'r' and (op == 'acquire' or (h[2] == '0' and h[3] == '0')))) then
    local qlen, in_use, next_token = tonumber(h[2]), tonumber(h[3]), tonumber(h[5])
    -- As read, so save() formats only the fields that changed (every string a script makes
    -- costs Redis its interning and its garbage collection).
    local qlen0, in_use0, next_token0, due0 = qlen, in_use, next_token, due
    local refresh = tonumber(h[8] or '0') <= now
    local function save()
      if qlen ~= qlen0 then h[2] = fmt(qlen) end
      if in_use ~= in_use0 then h[3] = fmt(in_use) end
      if next_token ~= next_token0 then h[5] = fmt(next_token) end
      if due ~= due0 then h[14] = fmt(due) end
      if refresh then h[8] = fmt(now + TTL_REFRESH) end
      redis.call('SET', K_HOT, table.concat(h, '|'), 'KEEPTTL')
      if refresh then
        for i = 1, 9 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
      end
    end
    -- Keys that were empty (so gone) get their TTL when they come back.
    local function created(...)
      if refresh then return end   -- save() refreshes every key
      for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ARGV[3]) end
    end
    local function next_due()
      if due >= NONE then return '-1' end
      return fmt(due - now)
    end
    if op == 'acquire' then
      local permits, lease = tonumber(ARGV[4]), tonumber(h[6])
      if ARGV[5] ~= '' then lease = tonumber(ARGV[5]) end
      local key = ARGV[7]
      if permits >= 1 and permits <= tonumber(h[7]) and lease >= MIN_LEASE and lease <= MAX_LEASE
        and qlen == 0 and mode == 'r' then
        -- GCRA (as rate_at/take_rate below): granted at once, or refused if it cannot wait.
        local t, tat, burst = tonumber(h[19]), tonumber(h[18]), tonumber(h[20])
        local ra = math.max(0, tat + t * permits - t * burst)
        if ra <= now then
          local token = math.max(next_token, now)
          next_token = token + 1
          h[18] = fmt(math.max(tat, now) + t * permits)
          h[9], h[21] = fmt(tonumber(h[9]) + 1), fmt(tonumber(h[21]) + 1)
          save()
          return {'granted', fmt(token), fmt(permits), '0', fmt(now), fmt(now), '0', next_due()}
        end
        local wait = tonumber(h[15])
        if ARGV[6] ~= '' then wait = math.min(tonumber(ARGV[6]), wait) end
        if ra - now > wait then
          h[22] = fmt(tonumber(h[22]) + 1)
          save()
          return {'timeout', fmt(math.max(ra - now, 1000)), next_due()}
        end
      elseif permits >= 1 and permits <= tonumber(h[7]) and lease >= MIN_LEASE
        and lease <= MAX_LEASE and mode == '1' then
        if qlen == 0 and in_use + permits <= tonumber(h[4]) then
          local token = math.max(next_token, now)
          local deadline = now + lease
          -- The waiter key rides along, and indexes the grant (`k:KEY`), so a caller that lost
          -- this reply can still find and return it (cancel, below).
          if idem(key) then
            redis.call('HSET', K_HOLD, fmt(token), fmt(permits) .. '|' .. fmt(deadline) .. '|' ..
              fmt(now) .. '|' .. key .. '|' .. (ARGV[9] or ''), 'k:' .. key, 'I|' .. fmt(token),
              'a:' .. key, ARGV[10] or '')
          elseif key ~= '' then
            redis.call('HSET', K_HOLD, fmt(token), fmt(permits) .. '|' .. fmt(deadline) .. '|' ..
              fmt(now) .. '|' .. key .. '|' .. (ARGV[9] or ''), 'k:' .. key, 'I|' .. fmt(token))
          else
            redis.call('HSET', K_HOLD, fmt(token), fmt(permits) .. '|' .. fmt(deadline) .. '|' ..
              fmt(now) .. '||' .. (ARGV[9] or ''))
          end
          redis.call('ZADD', K_LEASE, fmt(deadline), fmt(token))
          if in_use == 0 then created(K_HOLD, K_LEASE) end
          in_use, next_token = in_use + permits, token + 1
          h[9] = fmt(tonumber(h[9]) + 1)
          due = math.min(due, deadline)
          save()
          return {'granted', fmt(token), fmt(permits), fmt(lease), fmt(deadline), fmt(now), '0',
                  next_due()}
        end
        local wait = tonumber(h[15])
        if ARGV[6] ~= '' then wait = math.min(tonumber(ARGV[6]), wait) end
        if wait >= 1 and qlen < tonumber(h[16]) then
          -- Queued behind others (or behind a full limit): three writes.
          local seq_s = h[12]
          local seq, deadline = tonumber(seq_s), now + wait
          -- An absent max_dl (a hot value older than it) puts the waiter in `waits`: safe.
          local max_dl = qlen == 0 and 0 or tonumber(h[23] or '') or NONE
          local in_waits = deadline < max_dl
          local mem = member(key, permits, lease, deadline, now, in_waits, ARGV[8], ARGV[9])
          if idem(key) then
            redis.call('HSET', K_HOLD, 'k:' .. key, 'W|' .. seq_s .. '|' .. mem,
              'a:' .. key, ARGV[10] or '')
          else
            redis.call('HSET', K_HOLD, 'k:' .. key, 'W|' .. seq_s .. '|' .. mem)
          end
          redis.call('ZADD', K_Q, seq_s, mem)
          -- (A TTL is set after the write that creates the key.)
          if qlen == 0 and in_use == 0 then created(K_HOLD) end
          if in_waits then
            redis.call('ZADD', K_WAITS, fmt(deadline), wait_member(seq, key))
            created(K_WAITS)   -- it may have been empty; rare enough to ask every time
          else
            h[23] = fmt(deadline)
          end
          if qlen == 0 then created(K_Q) end
          if permits > 1 then
            redis.call('ZADD', K_HEAVY, seq_s, mem)
            if h[17] == '0' then created(K_HEAVY) end
            h[17] = fmt(tonumber(h[17]) + 1)
          end
          qlen = qlen + 1
          h[12], h[13] = fmt(seq + 1), fmt(tonumber(h[13]) + permits)
          due = math.min(due, deadline)
          save()
          return {'queued', fmt(wait), next_due()}
        end
      end
    elseif mode == 'r' then
      -- Rate only, nothing held (holders of a concurrency limit it had before may be) and
      -- nobody queued: nothing to release (a dropped permit still sends its release).
      return {'released', '0', next_due()}
    else
      local token = ARGV[4]
      local raw = is_token(token) and redis.call('HGET', K_HOLD, token)
      if not raw then return {'released', '0', next_due()} end
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
      h[11] = fmt(next_ewma(tonumber(h[11] or ''), held))
      if idem(wkey) then
        redis.call('HDEL', K_HOLD, token, 'k:' .. wkey, 'a:' .. wkey)
      elseif wkey ~= '' then
        redis.call('HDEL', K_HOLD, token, 'k:' .. wkey)
      else
        redis.call('HDEL', K_HOLD, token)
      end
      redis.call('ZREM', K_LEASE, token)
      in_use = math.max(0, in_use - permits)
      h[10] = fmt(tonumber(h[10]) + 1)
      -- The freed room goes to the head of the queue (strict FIFO: a head that does not fit
      -- holds back those behind it). With no heavy waiter, every waiter fits in one permit.
      local limit, heavy = tonumber(h[4]), tonumber(h[17])
      local granted, now_s = 0, fmt(now)
      local reply = {'released', '1'}
      while qlen > 0 and in_use < limit do
        local w
        if heavy > 0 then
          local head = redis.call('ZRANGE', K_Q, 0, 0, 'WITHSCORES')
          if not head[1] then break end
          w = parse_member(head[1], tonumber(head[2]))
          if in_use + w.permits > limit then break end
          redis.call('ZREM', K_Q, head[1])
        else
          local head = redis.call('ZPOPMIN', K_Q)
          if not head[1] then break end
          w = parse_member(head[1], tonumber(head[2]))
        end
        if w.in_waits then redis.call('ZREM', K_WAITS, wait_member(w.seq, w.key)) end
        if w.permits > 1 then
          redis.call('ZREM', K_HEAVY, w.member)
          heavy = heavy - 1
        end
        local t = math.max(next_token, now)
        local deadline = now + w.lease
        -- Each number formatted once (string.format is a large part of a script's time).
        local t_s, deadline_s = fmt(t), fmt(deadline)
        local outcome = 'G|' .. t_s .. '|' .. w.permits_s .. '|' .. w.lease_s .. '|' ..
          deadline_s .. '|' .. now_s .. '|' .. fmt(math.max(0, now - w.enqueued_at))
        -- The holder's record and the waiter's outcome (replacing its queue entry), in one write.
        redis.call('HSET', K_HOLD, t_s, w.permits_s .. '|' .. deadline_s .. '|' .. now_s .. '|' ..
          w.key .. '|' .. w.label, 'k:' .. w.key, outcome)
        redis.call('ZADD', K_LEASE, deadline_s, t_s)
        if in_use == 0 then created(K_LEASE) end
        in_use, next_token, qlen = in_use + w.permits, t + 1, qlen - 1
        h[13] = fmt(tonumber(h[13]) - w.permits)
        granted = granted + 1
        due = math.min(due, deadline)
        if w.channel == local_ch then
          reply[#reply + 1], reply[#reply + 2] = w.key, outcome
        else
          redis.call('PUBLISH', w.channel, name .. '\n' .. w.key .. '\n' .. outcome)
        end
      end
      h[9] = fmt(tonumber(h[9]) + granted)
      if heavy ~= tonumber(h[17]) then h[17] = fmt(heavy) end
      save()
      reply[#reply + 1] = next_due()
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

