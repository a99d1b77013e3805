-- wrk script: POST /v1/transfers between random accounts, a fresh Idempotency-Key per request.
-- Arguments (after --): accounts file (one id per line), token, run nonce, [batch size].
-- Batch size 0 (default) posts single transfers; N > 0 posts POST /v1/transfers/batch with N
-- items. Prints `acked=N` last (transfers answered 201), as the CPU-per-transfer tools expect.
local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   accounts = {}
   for line in io.lines(args[1]) do
      if #line > 0 then table.insert(accounts, line) end
   end
   token = args[2]
   nonce = args[3] or tostring(os.time())
   batch = tonumber(args[4] or "0")
   acked = 0
   failed = 0
   math.randomseed(os.time() + tid * 7919)
   -- wrk.format's headers argument replaces wrk.headers: every request builds its own.
   auth = "Bearer " .. token
end

local function pair()
   local n = #accounts
   local a = math.random(n)
   local b = math.random(n - 1)
   if b >= a then b = b + 1 end
   return accounts[a], accounts[b]
end

local function key()
   counter = counter + 1
   return nonce .. "-" .. tid .. "-" .. counter
end

function request()
   if batch > 0 then
      local items = {}
      for i = 1, batch do
         local s, d = pair()
         items[i] = string.format(
            '{"idempotency_key":"%s","source":"%s","destination":"%s","amount":1,"currency":"EUR"}',
            key(), s, d)
      end
      local body = '{"transfers":[' .. table.concat(items, ",") .. ']}'
      return wrk.format("POST", "/v1/transfers/batch",
                        {["Authorization"] = auth, ["Content-Type"] = "application/json"}, body)
   end
   local s, d = pair()
   local body = string.format('{"source":"%s","destination":"%s","amount":1,"currency":"EUR"}', s, d)
   return wrk.format("POST", "/v1/transfers", {["Authorization"] = auth,
      ["Content-Type"] = "application/json", ["Idempotency-Key"] = key()}, body)
end

function response(status, headers, body)
   if batch > 0 then
      if status == 200 then
         local _, n = string.gsub(body, '"status":201', "")
         acked = acked + n
         failed = failed + batch - n
      else
         failed = failed + batch
      end
   elseif status == 201 then
      acked = acked + 1
   else
      failed = failed + 1
      if failed <= 3 then io.stderr:write("wrk: HTTP " .. status .. " " .. body .. "\n") end
   end
end

function done(summary, latency, requests)
   local a, f = 0, 0
   for _, t in ipairs(threads) do
      a = a + t:get("acked")
      f = f + t:get("failed")
   end
   io.write(string.format("failed=%d\n", f))
   io.write(string.format("p50_ms=%.2f p99_ms=%.2f\n", latency:percentile(50) / 1000,
                          latency:percentile(99) / 1000))
   io.write(string.format("acked=%d\n", a))
end
