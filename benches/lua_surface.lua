-- The native calls the archive path makes on Prosody's loop, timed in plain Lua 5.4 (criterion
-- cannot hold a Lua state: the library links no Lua of its own). Per call: time, and the Lua
-- garbage it leaves (Prosody's default collector, incremental with a 105% pause, marks the
-- whole heap again for every few percent of garbage, so garbage costs more than it seems).
--
-- Run on an otherwise idle machine (wall-clock times): make bench-lua, or
--   lua5.4 benches/lua_surface.lua build/plugins/mod_mam_rs/mam_rs_native.so

local so = arg[1] or "build/plugins/mod_mam_rs/mam_rs_native.so";
local prosody = os.getenv("PROSODY_LIB") or "/usr/lib/prosody";
package.path = package.path .. ";" .. prosody .. "/?.lua";
package.cpath = package.cpath .. ";" .. prosody .. "/?.so";

local st = require "util.stanza";
-- Wall-clock time: os.clock() is the whole process's CPU time, the writer's and the query
-- workers' threads included, which is not what the loop pays.
local now = require "util.time".now;
local native = assert(package.loadlib(so, "luaopen_mam_rs_native"))();

local dir = os.tmpname();
os.remove(dir);
assert(os.execute("mkdir -p " .. dir));

local function open(extra)
	local options = { mam_rs_database = dir .. "/bench.sqlite", data_path = dir };
	for k, v in pairs(extra or {}) do options[k] = v; end
	return assert(native.open("localhost", options, st.stanza_mt));
end

-- The bench's chat message (tests/e2e/bench/run.py), as Prosody's parser leaves it.
local message = st.message({ to = "u2@localhost", from = "u1@localhost/bench", id = "u1-0-1", type = "chat" })
	:text_tag("body", "bench u1 1: the quick brown fox jumps over the lazy dog");

local function measure(name, n, f)
	collectgarbage();
	collectgarbage("stop");
	local before = collectgarbage("count");
	for i = 1, math.min(n, 10000) do f(i); end
	local garbage = (collectgarbage("count") - before) * 1024 / math.min(n, 10000);
	collectgarbage("restart");
	collectgarbage();
	local t0 = now();
	for i = 1, n do f(i); end
	local per_call = (now() - t0) / n;
	print(string.format("%-44s %8.2f µs %7.0f bytes of garbage", name, per_call * 1e6, garbage));
end

local N = tonumber(os.getenv("N")) or 200000;
print(string.format("%d calls each; %s", N, native.version));

measure("should_store (classification)", N, function () native.should_store(message); end);

-- Everything stripped: the stored copy is written, then refused as empty (no row queued).
local stripping = open({ dont_archive_namespaces = { "jabber:client" } });
measure("archive: the stored copy only", N, function ()
	stripping:archive(message, "u1", "u2@localhost", false, nil, true);
end);
stripping:close();

local archive = open();
measure("archive: stored copy, id, queued for the writer", N, function ()
	archive:archive(message, "u1", "u2@localhost", false, nil, true);
end);

-- A page: the 50 newest results of a query, built as util.stanza tables by results:take() (on
-- the worker: the SQL and parsing; timed here: the building on the loop), against building the
-- same 50 result messages in Lua with util.stanza, as stock and the bench's memory reference
-- module do (mod_mam.lua:178-229).
local xmlns_mam, xmlns_forward, xmlns_delay = "urn:xmpp:mam:2", "urn:xmpp:forward:0", "urn:xmpp:delay";
local query = st.stanza("query", { xmlns = xmlns_mam, queryid = "q" })
	:tag("set", { xmlns = "http://jabber.org/protocol/rsm" }):text_tag("max", "50"):tag("before"):up():up();
local function page()
	archive:query(query, "u1", "u1@localhost/bench", "u1@localhost");
	while true do
		local _, completions = archive:drain();
		if completions[1] and completions[1].results then return completions[1]; end
		assert(not (completions[1] and completions[1].condition), "query failed");
	end
end
local sample = page();
assert(sample.results:remaining() == 50, "expected a page of 50");
-- Only the drain that carries the answer is timed: the query runs first, off the clock.
local function timed_drain()
	archive:query(query, "u1", "u1@localhost/bench", "u1@localhost");
	local t, c;
	repeat
		local t0 = now();
		c = select(2, archive:drain())[1];
		local built = c and c.results and c.results:take(50);
		t = now() - t0;
		assert(not built or #built == 50);
	until c and c.results;
	return t;
end
local pages = math.max(1, N // 200);
local drain_time = 0;
for _ = 1, pages do drain_time = drain_time + timed_drain(); end
print(string.format("%-44s %8.2f µs per page of 50", "results:take(50): a page as util.stanza", drain_time / pages * 1e6));
local function lua_page()
	local results = {};
	for i = 1, 50 do
		local stored = st.message({ xmlns = "jabber:client", from = "u1@localhost/bench", to = "u2@localhost", type = "chat", id = "u1-0-" .. i })
			:text_tag("body", "bench u1 1: the quick brown fox jumps over the lazy dog");
		results[i] = st.message({ to = "u1@localhost/bench", from = "u1@localhost" })
			:tag("result", { xmlns = xmlns_mam, queryid = "q", id = "0123456789ABC" })
			:tag("forwarded", { xmlns = xmlns_forward })
			:tag("delay", { xmlns = xmlns_delay, stamp = "2026-11-21T08:00:00Z" }):up()
			:add_child(stored);
	end
	return results;
end
measure("util.stanza in Lua: the same 50 results", pages, lua_page);
archive:close();

os.execute("rm -rf " .. dir);
