-- Benchmark-only plugin (tests/e2e/bench): the in-memory reference for `make bench`. Not for
-- production, and not an archive: it stores nothing that clients send.
--
-- It answers XEP-0313 archive queries (the search form's `with`, `start`, `end`, RSM `max`,
-- `before`, `after`, `<count>`, `<flip-page/>`) from rows held in memory, loaded once at start
-- from a seed file the benchmark writes. So its answer time is the floor for any archive module
-- inside Prosody: parsing the query as stock does (util.dataforms, util.rsm), picking the page
-- from in-memory indexes (binary searches; a `<count>` is an index difference), and building
-- and sending each result with util.stanza exactly as stock mod_mam does (mod_mam.lua:178-229),
-- with a new util.stanza object for each stored message, built from the row's fields.
--
-- The rows are held outside Lua's heap: packed (string.pack) into one file in shared memory
-- (/dev/shm, a tmpfs; the data directory where there is none), read back with seek and read.
-- Neither a Lua object per row nor large Lua strings would do:
-- - a million rows as Lua objects make every collection cycle mark millions of objects, so
--   the reference would measure Lua's collector rather than the cost of answering;
-- - held as a few large strings, they change the collector's schedule. Prosody runs it
--   incrementally with a 105% pause: a cycle starts each time the heap has grown by 5%. A
--   fresh server's heap is under 2 MB; 190 MB of row strings (1M rows) make a cycle start only
--   after some 9 MB of garbage, and Prosody's step multiplier (500) then sweeps that garbage
--   in a few long steps. Pages got faster than on any real small server (their garbage was
--   hardly ever collected) and other clients' pings got 10 ms stalls. Measured on 2026-11-21:
--   mod_mam_rs's pages took 1.0x the reference's with such a heap of its own and 1.6x
--   without, and plain Lua reproduces the stalls (README, Benchmark).
-- Reading a row costs a couple of system calls on memory, a few microseconds of a page's
-- milliseconds.
--
-- Options:
--   mam_memory_ref_seed = "/path/rows.tsv"   one row per line, oldest first, tab-separated:
--       user, id, when (Unix seconds), with (bare JID), from, to, type, message id, body
--   max_archive_query_results (default 50), as stock.
-- Ids are opaque strings; an unknown `before` / `after` id is item-not-found, as stock. When a
-- user's ids increase as strings (as mod_mam_rs's do) they are found by binary search, else
-- through a table in Lua's heap (which the benchmark's ids never need).

local st = require "util.stanza";
local rsm = require "util.rsm";
local dataform = require "util.dataforms".new;
local get_form_type = require "util.dataforms".get_type;
local datetime = require "util.datetime".datetime;
local jid_bare = require "util.jid".bare;
local time_now = require "util.time".now;

local s_pack, s_unpack, m_floor = string.pack, string.unpack, math.floor;
local t_concat = table.concat;

local xmlns_mam = "urn:xmpp:mam:2";
local xmlns_delay = "urn:xmpp:delay";
local xmlns_forward = "urn:xmpp:forward:0";

local default_max_items = 20;
local max_max_items = module:get_option_number("max_archive_query_results", 50);
local seed_path = module:get_option_string("mam_memory_ref_seed");

-- archives[user] = {
--   n        rows, oldest first (row numbers 1..n)
--   and the file offsets of these sections:
--   whens    n little-endian doubles (Unix seconds)
--   ids, id_off        the ids, concatenated; n + 1 uint32 offsets into them (1-based)
--   rows, row_off      "from\tto\ttype\tmsgid\tbody" of each row, concatenated; n + 1 offsets
--   by_with  { [bare jid] = { n = count, rows = offset of n uint32 row numbers } }
--   pos      nil when ids increase as strings (binary search), else { [id] = row }
-- }
local archives = {};
local rows_file, rows_path;

local function read_at(offset, len)
	rows_file:seek("set", offset);
	return rows_file:read(len);
end

local function u32(section, k) -- k-th (1-based) uint32 of a section
	return (s_unpack("<I4", read_at(section + 4 * k - 4, 4)));
end

local function when_of(a, i)
	return (s_unpack("<d", read_at(a.whens + 8 * i - 8, 8)));
end

-- The bytes between the i-th and i+1-th offsets of a blob section.
local function between(offsets, blob, i)
	local from, to = s_unpack("<I4I4", read_at(offsets + 4 * i - 4, 8));
	return read_at(blob + from - 1, to - from);
end

local function id_of(a, i)
	return between(a.id_off, a.ids, i);
end

-- Appends a section to the rows file; returns its offset.
local function write_section(data)
	local offset = rows_file:seek("end");
	assert(rows_file:write(data));
	return offset;
end

local function pack_archive(t)
	local n = #t.ids;
	local function offsets(strings)
		local offs, pos = {}, 1;
		for i = 1, n do
			offs[i] = s_pack("<I4", pos);
			pos = pos + #strings[i];
		end
		offs[n + 1] = s_pack("<I4", pos);
		return t_concat(offs);
	end
	local whens = {};
	for i = 1, n do whens[i] = s_pack("<d", t.whens[i]); end
	local a = {
		n = n;
		whens = write_section(t_concat(whens));
		ids = write_section(t_concat(t.ids)), id_off = write_section(offsets(t.ids));
		rows = write_section(t_concat(t.rows)), row_off = write_section(offsets(t.rows));
		by_with = {};
	};
	for with, list in pairs(t.by_with) do
		local packed = {};
		for k = 1, #list do packed[k] = s_pack("<I4", list[k]); end
		a.by_with[with] = { n = #list, rows = write_section(t_concat(packed)) };
	end
	for i = 2, n do
		if not (t.ids[i - 1] < t.ids[i]) then
			a.pos = {};
			for j = 1, n do a.pos[t.ids[j]] = j; end
			break;
		end
	end
	return a;
end

local function open_rows_file()
	local dir = "/dev/shm";
	local probe = io.open(dir .. "/.", "r");
	if probe then probe:close(); else dir = prosody.paths.data; end
	rows_path = ("%s/mam_memory_ref_%d_%s.bin"):format(dir, require "util.pposix".getpid(), module.host);
	rows_file = assert(io.open(rows_path, "w+b"));
	-- Gone from the directory at once; the open file lives until the process ends.
	os.remove(rows_path);
	rows_file:setvbuf("no");
end

local function load_seed(path)
	local t0 = time_now();
	open_rows_file();
	local f = assert(io.open(path, "r"));
	local loading = {};
	local rows = 0;
	for line in f:lines() do
		local user, id, when, with, rest = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$");
		if user then
			local t = loading[user];
			if not t then
				t = { ids = {}, whens = {}, rows = {}, by_with = {} };
				loading[user] = t;
			end
			local i = #t.ids + 1;
			t.ids[i], t.whens[i], t.rows[i] = id, tonumber(when), rest;
			local list = t.by_with[with];
			if not list then
				list = {};
				t.by_with[with] = list;
			end
			list[#list + 1] = i;
			rows = rows + 1;
		end
	end
	f:close();
	for user, t in pairs(loading) do
		archives[user] = pack_archive(t);
		loading[user] = nil;
	end
	collectgarbage("collect");
	module:log("info", "Loaded %d rows from %s into %s in %.1f s (Lua heap now %.1f MB)", rows, path, rows_path,
		time_now() - t0, collectgarbage("count") / 1024);
end

if seed_path then
	load_seed(seed_path);
end

-- The stored message of row i, as a new util.stanza object.
local function stored_message(a, i)
	local from, to, mtype, msgid, body = between(a.row_off, a.rows, i)
		:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$");
	return st.message({ xmlns = "jabber:client", from = from, to = to, type = mtype, id = msgid, ["xml:lang"] = "en" })
		:text_tag("body", body);
end

-- Row number of an id, or nil.
local function row_of(a, id)
	if a.pos then return a.pos[id]; end
	local lo, hi = 1, a.n;
	while lo <= hi do
		local mid = (lo + hi) // 2;
		local v = id_of(a, mid);
		if v == id then return mid; end
		if v < id then lo = mid + 1; else hi = mid - 1; end
	end
	return nil;
end

-- First position k in [lo, hi] for which pred(row at k) holds (pred is monotone: false, then
-- true); hi + 1 when none.
local function lower_bound(row_at, lo, hi, pred)
	while lo <= hi do
		local mid = (lo + hi) // 2;
		if pred(row_at(mid)) then hi = mid - 1; else lo = mid + 1; end
	end
	return lo;
end

local function identity(k) return k; end

local query_form = dataform {
	{ name = "FORM_TYPE"; type = "hidden"; value = xmlns_mam };
	{ name = "with"; type = "jid-single" };
	{ name = "start"; type = "text-single"; datatype = "xs:dateTime" };
	{ name = "end"; type = "text-single"; datatype = "xs:dateTime" };
};

module:hook("iq-get/self/" .. xmlns_mam .. ":query", function (event)
	event.origin.send(st.reply(event.stanza):query(xmlns_mam):add_child(query_form:form()));
	return true;
end);

module:hook("iq-set/self/" .. xmlns_mam .. ":query", function (event)
	local origin, stanza = event.origin, event.stanza;
	local query = stanza.tags[1];
	local qid = query.attr.queryid;

	local qwith, qstart, qend;
	local form = query:get_child("x", "jabber:x:data");
	if form then
		local form_type, err = get_form_type(form);
		if form_type ~= xmlns_mam then
			origin.send(st.error_reply(stanza, "modify", "bad-request", "Unexpected FORM_TYPE, expected '" .. xmlns_mam .. "'" .. (err and (": " .. err) or "")));
			return true;
		end
		form, err = query_form:data(form);
		if err then
			origin.send(st.error_reply(stanza, "modify", "bad-request", select(2, next(err))));
			return true;
		end
		qwith, qstart, qend = form["with"], form["start"], form["end"];
		qwith = qwith and jid_bare(qwith);
	end

	local qset = rsm.get(query);
	local qmax = math.min(qset and qset.max or default_max_items, max_max_items);
	local reverse = qset and qset.before or false;
	local before, after = qset and qset.before, qset and qset.after;
	if type(before) ~= "string" then before = nil; end
	local flip = reverse;
	if query:get_child("flip-page") then flip = not flip; end

	-- row_at(k): the row at position k (1..n) of the rows the filter draws from.
	local a = archives[origin.username];
	local row_at, n = identity, 0;
	if a and qwith then
		local list = a.by_with[qwith];
		if list then
			local section = list.rows;
			row_at, n = function (k) return u32(section, k); end, list.n;
		end
	elseif a then
		n = a.n;
	end

	-- The filter's range of positions, and the total (before any id bound, as stock).
	local lo, hi = 1, n;
	if qstart then
		lo = lower_bound(row_at, 1, n, function (i) return when_of(a, i) >= qstart; end);
	end
	if qend then
		hi = lower_bound(row_at, 1, n, function (i) return when_of(a, i) > qend; end) - 1;
	end
	local total = hi >= lo and (hi - lo + 1) or 0;

	for _, bound in ipairs({ { after, false }, { before, true } }) do
		local id, is_before = bound[1], bound[2];
		if id then
			local p = a and row_of(a, id);
			if not p then
				origin.send(st.error_reply(stanza, "modify", "item-not-found"));
				return true;
			end
			-- First position whose row is at or past the id's row.
			local k = lower_bound(row_at, 1, n, function (i) return i >= p; end);
			if is_before then
				hi = math.min(hi, k - 1);
			else
				if k <= n and row_at(k) == p then k = k + 1; end
				lo = math.max(lo, k);
			end
		end
	end

	local msg_reply_attr = { to = stanza.attr.from, from = stanza.attr.to };
	local results = {};
	local first, last;
	local count = 0;
	local complete = "true";
	local step = reverse and -1 or 1;
	local k = reverse and hi or lo;
	while lo <= k and k <= hi do
		count = count + 1;
		if count > qmax then
			complete = nil;
			break;
		end
		local i = row_at(k);
		local id = id_of(a, i);
		local fwd_st = st.message(msg_reply_attr)
			:tag("result", { xmlns = xmlns_mam, queryid = qid, id = id })
				:tag("forwarded", { xmlns = xmlns_forward })
					:tag("delay", { xmlns = xmlns_delay, stamp = datetime(m_floor(when_of(a, i))) }):up();
		fwd_st:add_child(stored_message(a, i));
		if not first then first = id; end
		last = id;
		if flip then
			results[count] = fwd_st;
		else
			origin.send(fwd_st);
		end
		k = k + step;
	end
	if flip then
		for j = #results, 1, -1 do
			origin.send(results[j]);
		end
	end
	if reverse then
		first, last = last, first;
	end
	origin.send(st.reply(stanza)
		:tag("fin", { xmlns = xmlns_mam, complete = complete })
			:add_child(rsm.generate { first = first, last = last, count = total }));
	return true;
end);

module:hook("account-disco-info", function (event)
	(event.reply or event.stanza):tag("feature", { var = xmlns_mam }):up();
end);
