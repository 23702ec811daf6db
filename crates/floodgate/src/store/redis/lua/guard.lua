if not exists then
  if op == 'cancel' then
    -- The limiter is gone; an outcome recorded before it went may still be here.
    return {'gone', '-1'}
  end
  return {'unknown', '-1'}
end

