-- wrk connects to the URL's host and sends it as SNI and Host. bench.test has no DNS entry, so
-- connect to 127.0.0.1 instead (what curl --resolve does); SNI and Host stay bench.test.
local resolve = wrk.resolve
wrk.resolve = function(host, service)
   resolve("127.0.0.1", service)
end
