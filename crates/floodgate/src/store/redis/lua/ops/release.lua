-- release: give back a grant (idempotent).
-- ARGV: 4 token, 5 the caller's wake-up channel (optional).
-- Reply: {'released', '1' | '0', then key, outcome for each waiter of that channel it decided}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'release' then
  local token = ARGV[4]
  advance()
  local h = parse_holder(token)
  if not h then return finish({'released', '0'}) end
  drop_holder(token, h, false)
  in_use = math.max(0, in_use - h.permits)
  c.released = c.released + 1
  observe_hold(now - h.granted_at)
  grant_waiters()
  return finish({'released', '1'})
end

