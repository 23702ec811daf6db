-- (Plain script only.) A keyed limiter's operations run in the keyed script (`lua/keyed/`):
-- this one answers `keyed`, and the store runs the operation again there (and remembers it).
if m.keyed == '1' then return {'keyed', '-1'} end

