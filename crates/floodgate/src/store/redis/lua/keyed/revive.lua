-- A keyed limiter after Redis lost its state (store/redis/keyed_revive.rs): a server that knew
-- it re-creates it with `kput` in a learning window (ops/put.lua's `revive` mode: nothing is
-- granted until the window ends, waiters queue per key; keyed/layer.lua's advance ends it),
-- its overrides put back by the same call (keyed/put.lua). `learn` (ops/learn.lua) enters a window on the
-- state Redis has, as for a plain limiter.

-- kdef: what a server needs to re-create the limiter: the per-key spec and every override.
-- ARGV: none.
-- Reply: {'kdef', per-key concurrency ('' none), max_keys, total concurrency as configured
--         ('' none), per-key rate 'limit|period_us|burst' ('' none), then per override: key,
--         'concurrency|weight'}.
if op == 'kdef' then
  local out = {'kdef', ofmt(KD.conc), fmt(KD.max), m.k_user or '', m.k_rate or ''}
  local raw = redis.call('HGETALL', K_KO)
  for i = 1, #raw do out[#out + 1] = raw[i] end
  out[#out + 1] = '-1'
  return out
end

-- extend (keyed): ARGV[7] is the permit's key ('' not sent). During a learning window an extend
-- of a permit this limiter does not know, carrying its permits and its key, re-adopts it under
-- that key as well as the total (core/keyed/adopt.rs): the key's share is counted here, then
-- ops/extend.lua re-adopts it in the total (held, in in_use even above the limit, later tokens
-- above it). Without a key, or when a new key would exceed max_keys, it is not re-adopted:
-- ops/extend.lua then finds it lost (its size, ARGV[6], is cleared).
if op == 'extend' then
  local tkey, tok, adopt_permits = ARGV[7] or '', tonumber(ARGV[4]), opt(ARGV[6])
  local adopt = false
  if tkey ~= '' and not check_lease(tonumber(ARGV[5])) then
    -- Time first, as ops/extend.lua's own advance (then a no-op) and the core do.
    advance()
    adopt = learning_until and concurrency and adopt_permits and adopt_permits >= 1
      and tok and tok >= 1 and tok <= MAX_ADOPTED_TOKEN and not parse_holder(ARGV[4])
      and (kget(tkey) or redis.call('HLEN', K_KS) < KD.max)
  end
  if adopt then
    local k = kget(tkey) or new_key(tkey)
    redis.call('HSET', K_KH, fmt(tok), tkey)
    ktouch(K_KH)
    -- Above the key's limit if need be, like the total: it holds the key's waiters back.
    k.in_use = k.in_use + adopt_permits
    k.holders = k.holders + 1
    kdirty(tkey)
    reindex(tkey, k)
  else
    ARGV[6] = ''
  end
end
