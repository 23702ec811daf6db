-- learn: Redis changed under the store; enter (or prolong) a learning window.
-- ARGV: 4 window us.   Reply: {'ok'}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'learn' then
  -- ARGV[4]: a learning window in us. The store saw Redis change under it (a failover or a
  -- restart that may have lost the last writes): enter (or prolong) a window on the state that
  -- is here, as LimiterCore::enter_learning does. Reply: {'ok'}.
  local window = tonumber(ARGV[4]) or 0
  advance()
  if window > 0 then
    local until_ = now + window
    if not learning_until or until_ > learning_until then learning_until = until_ end
    -- Spend the burst: the tokens taken just before the loss are unknown.
    if rate_limit then tat = math.max(tat, now + interval() * rate_burst) end
  end
  return finish({'ok'})
end

