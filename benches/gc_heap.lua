-- How the size of Lua's heap changes what garbage costs under Prosody's collector settings
-- (incremental, pause 105%, step multiplier 500: util/startup.lua's defaults). Not part of any
-- target: it shows why the benchmark's memory reference keeps its rows outside Lua's heap
-- (README, Benchmark).
--
-- It keeps a live set of small tables like a fresh Prosody's heap, adds BALLAST_MB of large
-- strings (nothing for the collector to traverse), then times 4,000 batches of 600 small
-- tables of garbage, about what a page of results leaves.
--
--   lua5.4 benches/gc_heap.lua 0      # a fresh server's heap
--   lua5.4 benches/gc_heap.lua 190    # beside 190 MB of strings (1M rows held as strings)

package.path = package.path .. ";" .. (os.getenv("PROSODY_LIB") or "/usr/lib/prosody") .. "/?.lua";
package.cpath = package.cpath .. ";" .. (os.getenv("PROSODY_LIB") or "/usr/lib/prosody") .. "/?.so";
local now = require "util.time".now;

collectgarbage("incremental", 105, 500, 13);
local ballast_mb = tonumber(arg[1]) or 0;
local ballast = {};
for i = 1, 8 do
	ballast[i] = string.rep(string.char(64 + i), math.floor(ballast_mb * 1024 * 1024 / 8));
end
local live = {};
for i = 1, 15000 do
	live[i] = { name = "x" .. i, attr = { a = i }, tags = {} };
end
collectgarbage();

local batches = 4000;
local times = {};
for b = 1, batches do
	local t0 = now();
	local garbage = {};
	for i = 1, 600 do
		garbage[i] = { name = "m", attr = { to = "a", from = "b" .. i }, tags = {} };
	end
	times[b] = now() - t0;
end
table.sort(times);
print(string.format("%d MB of strings beside %d live tables: batch p50 %.3f ms, p99 %.3f ms, max %.3f ms (heap %.0f MB)",
	ballast_mb, #live, times[batches // 2] * 1e3, times[math.ceil(batches * 0.99)] * 1e3, times[batches] * 1e3,
	collectgarbage("count") / 1024));
