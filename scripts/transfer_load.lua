-- wrk script: same-shard transfers through one router, for CPU-per-transfer figures.
-- Env: TXR_TOKEN (bearer), TXR_SRC, TXR_DST (account ids of one shard). Prints acked=N last
-- (the 2xx answers), as /work/shared/tools/cpu_per_transfer.py expects.
local counter = 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.path = "/v1/transfers"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("TXR_TOKEN")
  wrk.body = string.format(
    '{"source": "%s", "destination": "%s", "amount": 1, "currency": "EUR"}',
    os.getenv("TXR_SRC"), os.getenv("TXR_DST"))
  math.randomseed(os.time() + tid)
end

function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = string.format("w%d-%d-%d", tid, counter, math.random(1, 1000000000))
  return wrk.format()
end

function done(summary, latency, requests)
  local e = summary.errors
  local bad = e.status + e.connect + e.read + e.write + e.timeout
  io.write(string.format("acked=%d\n", summary.requests - bad))
end
