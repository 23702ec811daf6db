-- kput: create or reconfigure a keyed limiter; the plain put (ops/put.lua, next) does the
-- total's part, and its grant_waiters() applies the per-key part first (apply_put).
-- ARGV: as the plain put (4: the total concurrency, MAX_CONCURRENCY when only the keys have
--       one), then, last, seven fields: per-key concurrency ('' none), max_keys, the total
--       concurrency as configured ('' none), 'keep' (a plain put of a keyed limiter: per-key
--       spec kept), per-key rate limit, period us, burst ('' none); then the overrides to
--       put back if this call re-creates the limiter in a learning window (a revival, or a put
--       that finds it vanished: keyed_revive.rs), as triples key, concurrency ('' the
--       default), weight; last, the number of triples.
-- Reply: as the plain put | {'plain'} (a keep for a limiter that is no longer keyed) |
--        {'invalid', 'per_key', message} (the limiter exists and is not keyed) | {'revived'}
--        (a revival of a limiter that exists: nothing changed).

if op == 'put' then return {'keyed', '-1'} end
if op == 'kput' then
  op = 'put'   -- the plain put runs next
  local n_over = tonumber(ARGV[#ARGV])
  local b = #ARGV - 1 - 3 * n_over - 7
  if exists and m.keyed ~= '1' then
    return {'invalid', 'per_key',
      'this limiter exists and is not keyed; delete it first to re-create it keyed', '-1'}
  end
  if ARGV[18] == 'revive' and exists then
    -- A revival (keyed_revive.rs) that another server or call made first: left as it is, and
    -- answered apart, so the store does not take its waiters for the lost incarnation's.
    return {'revived', '-1'}
  end
  if ARGV[b + 4] == 'keep' then
    if not exists then return {'plain', '-1'} end
    KD.put = {conc = KD.conc, max = KD.max, user = ARGV[b + 3], rate = m.k_rate or ''}
    -- No concurrency in total nor per key, a total rate: rate-only, its total runs without a
    -- concurrency limit (paced grants), as core/keyed total_spec_for.
    if ARGV[b + 3] == '' and not KD.conc and ARGV[9] ~= '' then ARGV[4] = '' end
  else
    local rate = ''
    if ARGV[b + 5] ~= '' then rate = ARGV[b + 5] .. '|' .. ARGV[b + 6] .. '|' .. ARGV[b + 7] end
    KD.put = {conc = opt(ARGV[b + 1]), max = tonumber(ARGV[b + 2]), user = ARGV[b + 3], rate = rate}
    -- Per-key rates alone (no concurrency nor rate in total): the total runs with no limit at
    -- all, as core/keyed total_spec_for; 'none' tells the plain put this is meant.
    if ARGV[4] == '' and ARGV[9] == '' and not KD.put.conc and rate ~= '' then ARGV[4] = 'none' end
  end
  if not exists then
    -- Keys of an earlier incarnation must not leak into this one.
    redis.call('UNLINK', K_KS, K_KO, K_KQ, K_RING, K_KH, K_BUSY, K_SLEEP, K_IDLE, KD.K_HEADS)
    KD.gen, KD.tmk, KD.created = 0, 0, 0
    -- Re-created in a learning window (the condition ops/put.lua enters it on): the overrides
    -- come back in this same call. Put back by separate `put_key`s, one that failed (or came
    -- late) left a key at the per-key default once the window ended: granted over its override
    -- (keyed_revive_redis, seen in CI).
    if n_over > 0 and (opt(ARGV[17]) or 0) > 0 and redis.call('EXISTS', K_TOK) == 0 then
      for i = b + 8, b + 7 + 3 * n_over, 3 do
        redis.call('HSET', K_KO, ARGV[i], ARGV[i + 1] .. '|' .. ARGV[i + 2])
      end
      ktouch(K_KO)
      -- Servers that read the overrides before read them again (see `keys`).
      redis.call('HSET', K_META, 'k_ov_at', fmt(now))
    end
  end
end

apply_put = function()
  local p = KD.put
  KD.put = nil
  local changed = p.conc ~= KD.conc or p.rate ~= (m.k_rate or '')
  KD.conc, KD.max, KD.rate = p.conc, p.max, parse_rate(p.rate)
  m.keyed, m.k_user, m.k_rate = '1', p.user, p.rate
  redis.call('HSET', K_META, 'keyed', '1', 'k_conc', ofmt(KD.conc), 'k_max', fmt(KD.max),
    'k_user', p.user, 'k_rate', p.rate)
  if not changed then return end
  -- New per-key defaults: every key's limit in force (an administrative operation, O(keys)).
  local raw = redis.call('HKEYS', K_KS)
  -- The latest `tat` of any key: a key's debt is kept across a change of the per-key rate, and
  -- may run past what the new one can owe (its burst lowered); recorded, so the keys are kept
  -- until it is over (layer.lua's keep_for).
  local debt_until = 0
  for _, tkey in ipairs(raw) do
    local k = kget(tkey)
    if k then
      k.limit, k.weight = limits_for(tkey)
      kdirty(tkey)
      if k.tat > debt_until then debt_until = k.tat end
    end
  end
  if debt_until > now then
    m.k_debt = fmt(debt_until)
    redis.call('HSET', K_META, 'k_debt', m.k_debt)
  end
  refuse_impossible()
  -- Keys the change readies join the ring oldest head first (ties by arrival), as the core's
  -- reconfigure does: HKEYS lists them in the order they were first written, which is Lua's
  -- table order, so the ring order (and who is granted next) differed from the core's and from
  -- run to run (h-krev16, keyed_twin). Keys without waiters are only dropped if idle.
  local ready = {}
  for _, tkey in ipairs(redis.call('ZRANGE', KD.K_HEADS, 0, -1)) do
    local h = key_head(tkey)
    if h then ready[#ready + 1] = {h.enqueued_at, h.seq, tkey} end
  end
  table.sort(ready, function(x, y)
    if x[1] ~= y[1] then return x[1] < y[1] end
    return x[2] < y[2]
  end)
  for _, r in ipairs(ready) do wake_key(r[3]) end
  for _, tkey in ipairs(raw) do maybe_drop(tkey) end
end

