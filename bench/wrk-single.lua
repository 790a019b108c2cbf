-- wrk's load of single events: one posthog-js-shaped $pageview per request to POST /e/, each
-- with a fresh uuid, for the same load on the appliance and on loadgen's bare server:
--   cargo run --release --bin loadgen -- --bare-server          (prints its address)
--   TOKEN=<a team's token> wrk -t2 -c64 -d10s -s bench/wrk-single.lua http://<address>
local token = os.getenv("TOKEN") or "phc_loadgenProjectToken000"
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local function uuid()
  return string.format("%08x-%04x-4%03x-%04x-%012x", math.random(0, 0xffffffff), math.random(0, 0xffff),
    math.random(0, 0xfff), math.random(0x8000, 0xbfff), math.random(0, 0xffffffffffff))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"event":"$pageview","distinct_id":"user-%d","uuid":"%s","properties":{"token":"%s","$current_url":"https://example.com/page/%d","$host":"example.com","$pathname":"/page/%d","$browser":"Chrome","$browser_version":131,"$os":"Mac OS X","$os_version":"10.15.7","$device_type":"Desktop","$screen_height":1080,"$screen_width":1920,"$viewport_height":960,"$viewport_width":1800,"$lib":"web","$lib_version":"1.200.0","$referrer":"$direct"}}', n % 1000, uuid(), token, n % 50, n % 50)
  return wrk.format(nil, "/e/", nil, body)
end
