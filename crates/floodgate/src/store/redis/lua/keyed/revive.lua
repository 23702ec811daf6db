-- A keyed limiter after Redis lost its state (store/redis/keyed_revive.rs): a server that knew
-- it re-creates it with `kput` in a learning window (ops/put.lua's `revive` mode: nothing is
-- granted until the window ends, waiters queue per key; keyed/layer.lua's advance ends it),
-- then puts its overrides back with `put_key`. `learn` (ops/learn.lua) enters a window on the
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

-- extend (keyed): an extend carries no key, so a permit this limiter does not know is never
-- re-adopted in a learning window (its key's share could not be counted): it is lost, as in
-- the keyed core (core/keyed/ops.rs extend). ops/extend.lua reads the permit's size from
-- ARGV[6]; without it, it does not re-adopt.
if op == 'extend' then ARGV[6] = '' end
