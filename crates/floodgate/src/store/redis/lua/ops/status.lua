-- status: the limiter's spec, state and counters.
-- ARGV: none.   Reply: {'status', fields of STATUS...}.
-- A reply made by finish() ends with the delay in us to the next deadline ('-1': none).

if op == 'status' then
  advance()
  local reply = status_fields()
  table.insert(reply, 1, 'status')
  return finish(reply)
end

