-- feedback: a backend call's outcome moves the adaptive limit (AIMD or gradient).
-- ARGV: 4 'ok' | 'throttled' | 'error', 5 latency us ('' not reported).
-- Reply: {'limit', limit in force ('' none)}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'feedback' then
  local outcome = ARGV[4]
  -- ARGV[5]: the call's latency in us ('' if not reported): the gradient controller uses it.
  local latency = opt(ARGV[5])
  -- Clamped to a day, as the core clamps it (core/adaptive's MAX_LATENCY): past 2^53 a double
  -- is not the integer sent, and past 2^63 '%d' writes a negative average into g_state.
  if latency then latency = math.min(latency, GRADIENT_MAX_LATENCY) end
  advance()
  c['feedback_' .. outcome] = c['feedback_' .. outcome] + 1
  if a_min and limit and string.sub(a_ext, 1, 9) == 'gradient|' then
    local new = gradient_feedback(outcome, latency)
    if new < limit then
      limit = new
      c.limit_decreases = c.limit_decreases + 1
      refuse_impossible()
    elseif new > limit then
      limit = new
      c.limit_increases = c.limit_increases + 1
      grant_waiters()
    end
  elseif a_min and limit then
    if outcome == 'throttled' then
      successes = 0
      -- Cooling interval: the cooldown or the typical hold time, whichever is longer.
      if not last_decrease or now >= last_decrease + math.max(a_cool, ewma or 0) then
        last_decrease = now
        local lowered = math.max(math.min(math.floor(limit * a_dec), limit - 1), a_min)
        if lowered < limit then
          limit = lowered
          c.limit_decreases = c.limit_decreases + 1
          refuse_impossible()
        end
      end
    elseif outcome == 'ok' then
      successes = successes + 1
      if successes >= limit then
        successes = 0
        local raised = math.min(limit + a_inc, a_max)
        if raised > limit then
          limit = raised
          c.limit_increases = c.limit_increases + 1
          grant_waiters()
        end
      end
    end
  end
  return finish({'limit', ofmt(limit)})
end

