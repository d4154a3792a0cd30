-- wrk script for `normserve bench`: POST one fixed body, then print a one-line JSON summary.
--
-- Configured through the environment, which every one of wrk's Lua states (one per thread plus
-- the main one) can read at load time:
--   BENCH_BODY_FILE       file whose bytes are the request body (read binary-safe)
--   BENCH_METHOD          HTTP method (default POST)
--   BENCH_HEADERS         "Name: value" lines separated by newlines (Content-Type and the like)
--   BENCH_COUNT_STATUSES  "1": count responses by status code. It installs a response() hook,
--                         which makes wrk parse every response into Lua and costs throughput,
--                         so the bench only turns it on where 503s must be told from other errors.
--
-- No request() function is defined, so wrk formats the request once per thread (a static
-- request: the cheapest path wrk has).

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
end
wrk.method = os.getenv("BENCH_METHOD") or "POST"
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^%s*([^:]-)%s*:%s*(.-)%s*$")
  if name and name ~= "" then
    wrk.headers[name] = value
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

if os.getenv("BENCH_COUNT_STATUSES") == "1" then
  statuses = {}
  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local counts, counted = {}, false
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    if s then
      counted = true
      for code, n in pairs(s) do
        counts[code] = (counts[code] or 0) + n
      end
    end
  end

  local pct = {}
  for _, p in ipairs({ 50, 75, 90, 95, 99, 99.9 }) do
    pct[#pct + 1] = string.format('"%s":%d', tostring(p), latency:percentile(p))
  end

  -- With statuses counted: bounds on the p99 of accepted (non-503) responses, from the
  -- all-responses histogram. With k 503s among n recorded responses, the accepted p99 lies
  -- between the overall percentiles at 99(n-k)/n and 100(k + 0.99(n-k))/n = 99 + k/n (the upper
  -- bound is exact when every 503 is faster than the accepted responses, as a load-shedding
  -- server's are). Written so that k = 0 gives exactly 99 for both: 100 * 0.99 * n / n is not 99
  -- in floating point, and wrk's percentile() would then pick the next recorded latency.
  -- n counts responses, summed over the statuses: `#latency` would be wrong, since wrk's
  -- stats_popcount counts the distinct latency values in the histogram, not the responses.
  local bounds = "null"
  local n, k = 0, counts[503] or 0
  for _, n_code in pairs(counts) do
    n = n + n_code
  end
  if counted and n > 0 and k < n then
    local lo = 99 - 99 * k / n
    local hi = 99 + k / n
    bounds = string.format('{"low":%d,"high":%d}', latency:percentile(lo), latency:percentile(hi))
  end

  local status_json = "null"
  if counted then
    local parts = {}
    for code, n_code in pairs(counts) do
      parts[#parts + 1] = string.format('"%d":%d', code, n_code)
    end
    status_json = "{" .. table.concat(parts, ",") .. "}"
  end

  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,"distinct":%d,"percentiles":{%s}},'
      .. '"accepted_p99_us":%s,"statuses":%s}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, #latency, table.concat(pct, ","),
    bounds, status_json
  ))
end
