-- advance: apply the passage of time (the store's timer).
-- ARGV: none.   Reply: {'ok'}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'advance' then
  advance()
  prune_outcomes()
  return finish({'ok'})
end

