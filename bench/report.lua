-- wrk script: POST the body in $BENCH_BODY_FILE, print one JSON line with p99.9 at the end.
-- wrk's own --latency output stops at p99; the harness reads the "BENCH_JSON" line instead.

local path = os.getenv("BENCH_BODY_FILE")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"

-- BENCH_REQUEST_IDS=1: every request carries its own X-Request-ID, as the LivePerson client and
-- boto3 (amz-sdk-invocation-id) send one, so the gateway's duplicate coalescing runs on each.
-- The prefix comes from /dev/urandom: ids never repeat across runs (a repeat would be a replay).
if os.getenv("BENCH_REQUEST_IDS") == "1" then
  local random = assert(io.open("/dev/urandom", "rb"))
  local prefix = random:read(8):gsub(".", function(c) return string.format("%02x", c:byte()) end)
  random:close()
  local counter = 0
  request = function()
    counter = counter + 1
    wrk.headers["X-Request-ID"] = prefix .. "-" .. counter
    return wrk.format()
  end
end

-- No response() callback: it would make wrk hand every response to Lua and slow it down.
-- summary.errors.status counts answers with a status above 399.

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
