-- wrk script: POST one JSON-RPC request per call with a unique id, check every answer.
--
-- Set by the bench in the environment:
--   BENCH_BODY     the request body, with the JSON-RPC id written as "id":0
--   BENCH_HEADERS  extra request headers, one "Name: value" per line
--   BENCH_MAX      stop each wrk thread after this many answers (a count bound; -d bounds time)
-- An answer counts as a failure unless it is HTTP 200 and holds a JSON-RPC "result"
-- (plain JSON or an SSE "data:" line) and no JSON-RPC "error" object.
-- done() prints one line: BENCH_RESULT {json}.

local body_template = os.getenv("BENCH_BODY") or error("BENCH_BODY is not set")
local prefix, suffix = body_template:match('^(.-"id":)0(.*)$')
if not prefix then error('BENCH_BODY must contain "id":0') end
local max_answers = tonumber(os.getenv("BENCH_MAX") or "0") or 0

local extra_headers = {}
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then extra_headers[name] = value end
end

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_number", counter)
  table.insert(threads, thread)
end

function init(args)
  sent = 0
  answers = 0
  failures = 0
  first_failure = ""
  id_base = thread_number * 1000000000
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  for name, value in pairs(extra_headers) do wrk.headers[name] = value end
end

function request()
  sent = sent + 1
  return wrk.format(nil, nil, nil, prefix .. (id_base + sent) .. suffix)
end

function response(status, headers, body)
  answers = answers + 1
  local ok = status == 200
    and body:find('"result":', 1, true) ~= nil
    and body:find('"error":{', 1, true) == nil
  if not ok then
    failures = failures + 1
    if first_failure == "" then first_failure = status .. " " .. body:sub(1, 300) end
  end
  if max_answers > 0 and answers >= max_answers then wrk.thread:stop() end
end

local function json_string(text)
  return '"' .. text:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

function done(summary, latency, requests)
  local failed, answered, first = 0, 0, ""
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("failures")
    answered = answered + thread:get("answers")
    if first == "" then first = thread:get("first_failure") end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"answers":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"max_us":%d,"failures":%d,"non_2xx":%d,"socket_errors":%d,"timeouts":%d,"first_failure":%s}\n',
    summary.requests, answered, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, failed, e.status, e.connect + e.read + e.write, e.timeout,
    json_string(first)))
end
