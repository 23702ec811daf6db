-- put: create or reconfigure the limiter.
-- ARGV: 4 concurrency ('' none), 5 default lease us, 6 max wait us, 7 max queue, 8 first token,
--       9-11 rate limit/period us/burst, 12-16 adaptive min/max/increase/decrease/cooldown us,
--       17 learning window us ('' none), 18 'revive' or '', 19 adaptive algorithm fields.
-- Reply: {'status', fields of STATUS...} | {'invalid', field, message} | {'deleted'} |
--        {'revived'} (a revival of a limiter that exists: nothing changed).
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'put' then
  -- Every key renewed by this call, for the new spec: a longer rate debt (a burst raised) needs
  -- longer TTLs at once, not at the next hourly renewal (common.lua's keep_ms).
  refresh = true
  -- The Rust side validates the whole spec first; these checks are a backstop.
  local conc, lease, wait, queue, first_token =
    opt(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local bad = check_spec(conc or 1, lease, wait, queue)
  if bad then return {'invalid', bad[1], bad[2]} end
  local new_rate = {opt(ARGV[9]), opt(ARGV[10]), opt(ARGV[11])}
  local new_adaptive = {opt(ARGV[12]), opt(ARGV[13]), opt(ARGV[14]), opt(ARGV[15]), opt(ARGV[16])}
  -- ('none': a keyed limiter's total with per-key rates alone, see keyed/put.lua.)
  if not conc and not new_rate[1] and ARGV[4] ~= 'none' then return {'invalid', 'concurrency', 'a limiter needs a concurrency limit, a rate limit, or both'} end
  -- ARGV[17]: a learning window in us ('' or 0: none), entered only if this call creates the
  -- limiter and it was not deleted on purpose (no tombstone). ARGV[18]: 'revive' when a server
  -- re-creates a limiter it knew that vanished: then an existing limiter is left as it is, and a
  -- deleted one (tombstone) is not resurrected.
  local learn_us, mode = opt(ARGV[17]) or 0, ARGV[18] or ''
  -- ARGV[19]: the adaptive spec's rest ('algorithm|tolerance|probe_rounds'), '' without one.
  local new_ext = ARGV[19] or ''
  local tombstone = not exists and redis.call('EXISTS', K_TOK) == 1
  if mode == 'revive' then
    if tombstone then return {'deleted', '-1'} end
    -- Revived first by another server or call (store/redis/revive.rs): left as it is, and
    -- answered apart, as keyed/put.lua's kput does.
    if exists then return {'revived', '-1'} end
  end
  if not exists then
    -- Keys of an earlier incarnation that outlived its meta (they expire a little later)
    -- must not leak into this one.
    -- UNLINK frees them in the background, however large.
    redis.call('UNLINK', K_HOLD, K_LEASE, K_Q, K_HEAVY, K_WAITS, K_OUT, K_OUTT)
    hot_in_holders = false   -- gone with `holders`: finish() creates it again, with its TTL
    heavy, due = 0, 0
    -- Seeded from the store's clock, and above any token of a deleted incarnation.
    next_token = math.max(first_token, now, tonumber(redis.call('GET', K_TOK) or '0'))
    -- The tombstone has served as the token floor; from now on the limiter exists.
    if tombstone then redis.call('DEL', K_TOK) end
  else
    -- Time that has passed is settled under the old spec, as the core does.
    advance()
  end
  -- The blocks below compare the old spec with the new one, so they run before the new
  -- fields are assigned.
  -- Every queued waiter fits the cap in force (acquire and every lowering see to it), so only
  -- a lower cap can make one impossible: an unchanged spec reads no waiter.
  local old_cap = exists and permit_cap() or nil
  -- Debt under the old rate is rescaled to the new one, so a raised rate applies now.
  if exists and rate_limit and new_rate[1] and tat > now then
    local old_t = interval()
    local new_t = math.max(1, math.ceil(new_rate[2] / new_rate[1]))
    tat = now + math.floor((tat - now) * new_t / old_t)
  end
  -- A learned adaptive limit survives a change of other fields; a new concurrency or adaptive
  -- range resets it.
  local same = exists and conc == concurrency and new_adaptive[1] == a_min and
    new_adaptive[2] == a_max and new_adaptive[3] == a_inc and new_adaptive[4] == a_dec and
    new_adaptive[5] == a_cool and new_ext == a_ext
  -- Any change of the rate (its burst too, which leaves `tat` as it was) moves the token times
  -- the latest reservation was made with: nothing of it is given back after (as the core).
  if exists and (rate_limit ~= new_rate[1] or rate_period ~= new_rate[2] or rate_burst ~= new_rate[3]) then
    redis.call('HDEL', K_META, 'res')
  end
  rate_limit, rate_period, rate_burst = new_rate[1], new_rate[2], new_rate[3]
  a_min, a_max, a_inc, a_dec, a_cool =
    new_adaptive[1], new_adaptive[2], new_adaptive[3], new_adaptive[4], new_adaptive[5]
  concurrency, default_lease, max_wait, max_queue = conc, lease, wait, queue
  if not same then
    limit = conc
    successes = 0
    redis.call('HDEL', K_META, 'g_state')
  end
  if new_ext ~= a_ext then
    a_ext = new_ext
    if a_ext == '' then redis.call('HDEL', K_META, 'a_ext') else redis.call('HSET', K_META, 'a_ext', a_ext) end
  end
  -- The limit in force always lies within the adaptive range.
  if limit and a_min then limit = math.min(math.max(limit, a_min), a_max) end
  if not exists and not tombstone and learn_us > 0 then
    -- State was lost: learn who still holds permits before granting (core/learning.rs).
    learning_until = now + learn_us
    if rate_limit then tat = math.max(tat, now + interval() * rate_burst) end
  end
  local new_cap = permit_cap()
  if old_cap and new_cap and new_cap < old_cap then refuse_impossible() end
  grant_waiters()
  local reply = status_fields()
  table.insert(reply, 1, 'status')
  return finish(reply)
end

