-- extend: move a held grant's lease deadline; re-adopt an unknown one while learning.
-- ARGV: 4 token, 5 lease us, 6 permits ('' not sent).
-- Reply: {'extended', deadline} | {'lost'} | {'invalid', 'lease_ms', message}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'extend' then
  -- ARGV[6]: the permit's size ('' if not sent), for re-adoption during a learning window.
  local token, lease, adopt_permits = ARGV[4], tonumber(ARGV[5]), opt(ARGV[6])
  local bad = check_lease(lease)
  if bad then return {'invalid', 'lease_ms', bad, '-1'} end
  advance()
  local h = parse_holder(token)
  local tok = tonumber(token)
  if not h and learning_until and concurrency and adopt_permits and adopt_permits >= 1
    and tok and tok >= 1 and tok <= MAX_ADOPTED_TOKEN then
    -- Re-adopted (core/learning.rs): held again, counted in in_use even above the limit;
    -- later tokens start above it.
    local deadline = now + lease
    local first_holder = in_use == 0
    local rec = fmt(adopt_permits) .. '|' .. fmt(deadline) .. '|' .. fmt(now) .. '|'
    -- Its own lease slot, unless a later holder was handed the slot named by this token (a
    -- release's handoff, common.lua): then a slot of its own under another name.
    local slot = fmt(tok)
    if redis.call('HEXISTS', K_HOLD, 's:' .. slot) == 1 then
      slot = 'a' .. slot
      redis.call('HSET', K_HOLD, fmt(tok), rec, 'l:' .. fmt(tok), slot, 's:' .. slot, fmt(tok))
    else
      redis.call('HSET', K_HOLD, fmt(tok), rec)
    end
    redis.call('ZADD', K_LEASE, fmt(deadline), slot)
    if first_holder then created(K_LEASE) end   -- (`holders` has `hot`: see grant)
    in_use = in_use + adopt_permits
    next_token = math.max(next_token, tok + 1)
    c.granted = c.granted + 1
    c.adopted = c.adopted + 1
    return finish({'extended', fmt(deadline)})
  end
  if not h then
    c.extend_lost = c.extend_lost + 1
    return finish({'lost'})
  end
  local deadline = now + lease
  redis.call('HSET', K_HOLD, token,
    fmt(h.permits) .. '|' .. fmt(deadline) .. '|' .. fmt(h.granted_at) .. '|' .. h.key .. '|' .. h.label)
  redis.call('ZADD', K_LEASE, fmt(deadline), h.slot)
  return finish({'extended', fmt(deadline)})
end

