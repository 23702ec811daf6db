return redis.error_reply('floodgate: unknown op ' .. tostring(op))
