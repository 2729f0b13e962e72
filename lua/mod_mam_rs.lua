-- mod_mam_rs: XEP-0313 Message Archive Management for Prosody, a drop-in for mod_mam.
--
-- This file is the Prosody-facing glue only: it reads options, registers the same hooks at
-- the same priorities as mod_mam, and hands stanzas to the native library (mam_rs_native.so),
-- which classifies, stores and queries on its own threads. The event loop never waits on
-- the database: it is woken through an eventfd when results or commits are ready.

local st = require "util.stanza";
local jid = require "util.jid";
local async = require "util.async";
local server = require "net.server";
local timer = require "util.timer";
local filters = require "util.filters";
local um = require "core.usermanager";
local rm_load_roster = require "core.rostermanager".load_roster;
local new_cache = require "util.cache".new;
local time_now = require "util.time".now;

local xmlns_mam = "urn:xmpp:mam:2";
local xmlns_mam_ext = "urn:xmpp:mam:2#extended";
local xmlns_st_id = "urn:xmpp:sid:0";

local host = module.host;
local jid_prepped_split = jid.prepped_split;

-- The native library sits beside this file (plugin_paths, make install), or in the
-- installer tree (prosodyctl install), which Prosody 0.12 leaves off package.cpath.
local function load_native()
	local name = "mam_rs_native";
	if package.loaded[name] then return package.loaded[name]; end
	local tried = {};
	local candidates = { module:get_directory() .. "/" .. name .. ".so" };
	if prosody.paths.installer then
		table.insert(candidates, prosody.paths.installer .. "/lib/lua/5.4/" .. name .. ".so");
	end
	for _, path in ipairs(candidates) do
		local open, err = package.loadlib(path, "luaopen_" .. name);
		if open then
			package.loaded[name] = open();
			return package.loaded[name];
		end
		table.insert(tried, path .. " (" .. tostring(err) .. ")");
	end
	error("cannot load " .. name .. ".so; tried: " .. table.concat(tried, ", "));
end

local native = load_native();
local jid_parts = native.jid_parts;

-- The options the native side reads, as a module context (this host, or another one for the
-- prosodyctl command) sees them.
local option_names = {
	"max_archive_query_results", "default_archive_policy", "dont_archive_namespaces", "archive_store",
	"mam_include_total", "mam_smart_enable", "archive_compression", "storage_archive_item_limit", "archive_expires_after",
	"archive_cleanup_interval", "mam_remove_expired_messages_period", "smart_retention_strategy",
	"smart_retention_min", "mam_rs_query_workers", "mam_rs_max_ids_per_query", "mam_rs_max_prefs_jids",
	"mam_rs_max_queries_per_second", "mam_rs_max_queued_rows", "sqlite_tune",
	"mam_rs_test_query_delay",
};
local function read_options(ctx)
	local opts = {};
	for _, name in ipairs(option_names) do
		opts[name] = ctx:get_option(name);
	end
	opts.mam_rs_database = ctx:get_option_path("mam_rs_database", "mam_rs.sqlite", "data");
	-- Where the archive goes: mam_rs_sql, else Prosody's sql block when it names a server.
	opts.sql = ctx:get_option("sql");
	local own = ctx:get_option("mam_rs_sql");
	if type(own) == "table" and own.driver == "SQLite3" and type(own.database) == "string" then
		own = { driver = "SQLite3",
			database = require "core.configmanager".resolve_relative_path(prosody.paths.data or ".", own.database) };
	end
	opts.mam_rs_sql = own;
	-- Stock counts totals by default only while messages expire (mod_mam.lua:601-606).
	local expires_after = opts.archive_expires_after;
	local never_expires = expires_after == "never" or expires_after == false
		or (type(expires_after) == "number" and expires_after < 0);
	if opts.mam_include_total == nil and never_expires then
		opts.mam_include_total = false;
	end
	return opts;
end

local options = read_options(module);
local settings, config_lines = native.parse_config(options);
for _, line in ipairs(config_lines) do
	module:log(line.level, "%s", line.message);
end

-- The prosodyctl commands (commands.lib.lua), and the cleanup rules the schedule shares.
local run_command, cleanup_rules = module:require("commands")(native, read_options);

function module.command(arg)
	return run_command(arg);
end

if prosody.process_type == "prosodyctl" then
	return; -- No threads and no hooks inside prosodyctl.
end

if require "core.modulemanager".is_loaded(host, "mam") then
	module:log("error", "mod_mam is loaded on %s too; load only one of mod_mam and mod_mam_rs", host);
end

local host_events = prosody.hosts[host].events;
local archive = assert(native.open(host, options, st.stanza_mt));
local node, unreachable = archive:node();
if node then
	module:log("info", "Archive in %s%s, writer node %d (mam_rs_native %s)", settings.database,
		settings.durability or "", node, native.version);
else -- A database server that does not answer yet; the native side keeps trying.
	module:log("error", "Cannot reach the archive %s yet (%s): messages are delivered without being archived, "
		.. "and archive queries get a try-again-later error, until it answers; retrying (mam_rs_native %s)",
		settings.database, unreachable, native.version);
end

-- Completions: the native side wakes us through an eventfd.
local pending = {}; -- ticket -> callback(completion), for queries and expiry runs
-- What waits for a commit, in release order: waiting_at[i] is the release mark waiting_for[i]
-- waits for: a function to call (a handler's async waiter, an archive-message-added event), or
-- a session whose held stanzas go out then (see hold_until_committed). Marks are pushed in
-- increasing order.
local waiting_at, waiting_for, waiting_head, waiting_tail = {}, {}, 1, 0;
local released = 0; -- rows handed out up to this mark are committed (or given up as failing)
local issued = 0; -- the last release mark this module handed out
-- Set when unloading starts. Prosody removes a module's hooks only after module.unload has
-- run, and the deliveries released during unload go on to their sessions' next stanzas.
local closed = false;

local flush_held, sending_on; -- defined with the filter below

local function release_waiting()
	while waiting_head <= waiting_tail and waiting_at[waiting_head] <= released do
		local what = waiting_for[waiting_head];
		waiting_at[waiting_head], waiting_for[waiting_head] = nil, nil;
		waiting_head = waiting_head + 1;
		-- One failing waiter (another module's filter or event handler) must not hold up the rest.
		if type(what) == "function" then
			local ok, err = pcall(what);
			if not ok then
				module:log("error", "Error in what waited for a commit: %s", err);
			end
		else
			local ok, err = pcall(flush_held, what);
			if not ok then
				sending_on = nil;
				module:log("error", "Could not send a held stanza to %s: %s", what.full_jid or "a session", err);
			end
		end
	end
	if waiting_head > waiting_tail then -- Empty: start again at 1, so the table stays a short array.
		waiting_head, waiting_tail = 1, 0;
	end
end

local function wait_for_mark(mark, what)
	waiting_tail = waiting_tail + 1;
	waiting_at[waiting_tail], waiting_for[waiting_tail] = mark, what;
end

-- Answers still going out, a chunk per loop turn (see send_answer); finished at once on unload.
local sending = {};

local function send_more()
	for send_some, started in pairs(sending) do
		if started == "now" then -- Its first chunk went out this turn.
			sending[send_some] = true;
		elseif not send_some() then
			sending[send_some] = nil;
		end
	end
	if next(sending) then
		archive:poke(); -- Another turn: our eventfd is readable again at once.
	end
end

-- archive:drain() first ends the loop's turn for the archive: the messages archived since the
-- last drain go to the writer together (the first of them made our eventfd readable).
local function on_readable()
	local now_released, completions = archive:drain();
	if now_released > released then
		released = now_released;
		release_waiting();
	end
	for _, c in ipairs(completions) do
		if c.log then
			module:log(c.log, "%s", c.message);
		else
			local callback = pending[c.ticket];
			pending[c.ticket] = nil;
			-- One failing callback must not lose the others taken in the same drain.
			local ok, err = pcall(callback or function () end, c);
			if not ok then
				module:log("error", "Could not complete an archive request: %s", err);
			end
		end
	end
	send_more();
end

local watcher = server.watchfd(archive:fd(), on_readable);

-- While a session's handler waits, mod_c2s pauses its connection. Prosody 0.12's server_epoll
-- does not look at LuaSocket's own read buffer when a paused connection resumes, so stanzas
-- already read into it would sit there until the client sends more. Read them once the
-- connection reads again, as server_epoll's own pausefor() does. A global timer, not a module
-- timer: module timers stop at unload, and a check cut short by a reload would leave the flag
-- set and the session's buffered stanzas unread for good.
local function read_buffered(session)
	if not session or session.mam_rs_read_check then return; end
	local conn = session.conn;
	local sock = type(conn) == "table" and conn.conn;
	if not (sock and sock.dirty and conn.onreadable and sock:dirty()) then
		return;
	end
	session.mam_rs_read_check = true;
	local tries = 0;
	timer.add_task(0, function ()
		tries = tries + 1;
		if conn.conn ~= sock or not sock:dirty() or tries > 2000 then
			session.mam_rs_read_check = nil;
			return;
		end
		if not conn._wantread then
			return 0.005; -- Still paused: the session's handler is waiting again.
		end
		session.mam_rs_read_check = nil;
		conn:onreadable();
	end);
end

-- Holds the calling session's handler until the row is committed: only when the writer falls
-- behind (archive:backlogged()), so that a fast sender cannot fill the queue. Outside an async
-- runner there is nothing to pause.
local function wait_committed(release_at, session)
	if release_at <= released or not async.ready() then return; end
	local wait, done = async.waiter();
	wait_for_mark(release_at, done);
	wait();
	read_buffered(session);
end

-- Held deliveries. A stanza-id reaches a client only once its row is committed, so that an id
-- a client has seen survives a crash. The message goes on through the server at once (the
-- sender's session is not paused); what waits is its way out to the client: while rows this
-- module handed out are not yet committed, a message sent to a client session of this host is
-- held, with everything sent to that session after it, in order, and sent on once the rows
-- handed out before it are committed. The filter comes before every other (mod_stanza_debug's
-- is 10000, mod_smacks' -999), so each of them sees a held stanza once, when it goes out.
local HOLD_PRIORITY = 100000;
-- sending_on: the held stanza flush_held is sending, which passes the filter.
local answering = false; -- query results are going out: their rows are committed

-- A held stanza has been through session.send once already. Where that send is Prosody 0.12's
-- sessionmanager's (mod_c2s's and mod_websocket's sessions, resumed by mod_smacks or not),
-- which is a debug line, the stanzas/out filters and rawsend, the stanza goes on through the
-- filters and rawsend only: the debug line's argument, stanza:top_tag(), clones and serialises
-- the top element again, about 1 KB of garbage and 5 us a message. Any other send (mod_bosh's,
-- a closed session's, another module's wrapper, or one of a Prosody version this has not been
-- checked against) is called again as it is. 13.0's send is 0.12's, line for line.
local plain_sends = setmetatable({}, { __mode = "k" }); -- send function -> it is sessionmanager's
local prosody_version = tostring(prosody.version);
local checked_version = prosody_version:match("^0%.12%.") ~= nil or prosody_version:match("^13%.0%.") ~= nil;

local function is_plain_send(send)
	local plain = plain_sends[send];
	if plain == nil then
		local source = type(send) == "function" and debug.getinfo(send, "S").source or "";
		plain = checked_version and source:match("core/sessionmanager%.lua$") ~= nil;
		plain_sends[send] = plain;
	end
	return plain;
end

local function send_held(session, stanza)
	sending_on = stanza;
	local filter, rawsend = session.filter, session.rawsend;
	if filter and rawsend and is_plain_send(session.send) then
		stanza = filter("stanzas/out", stanza);
		if stanza then rawsend(stanza); end
	else
		session.send(stanza);
	end
end

-- Sends on `session`'s held stanzas whose rows are committed (all of them with `everything`).
function flush_held(session, everything)
	local held = session.mam_rs_held;
	if not held then return; end
	local at = held.at;
	while held.head <= held.tail and (everything or at[held.head] <= released) do
		local i = held.head;
		local stanza = held[i];
		held[i], at[i] = nil, nil;
		held.head = i + 1;
		send_held(session, stanza);
	end
	sending_on = nil;
end

local function hold_until_committed(stanza, session)
	if stanza == sending_on or session.host ~= host or session.type ~= "c2s" then
		return stanza;
	end
	local held = session.mam_rs_held;
	local behind = held and held.head <= held.tail and held.at[held.tail]; -- the last held one's mark
	-- A message may carry any id handed out so far; archive results carry committed ones.
	local mark = (stanza.name == "message" and not answering) and issued or 0;
	if mark > (behind or released) then
		wait_for_mark(mark, session);
	elseif behind then
		mark = behind; -- Behind what is held already, whatever it is.
	else
		return stanza;
	end
	if not held then
		held = { head = 1, tail = 0, at = {} };
		session.mam_rs_held = held;
	elseif held.head > held.tail then
		held.head, held.tail = 1, 0;
	end
	local i = held.tail + 1;
	held[i], held.at[i], held.tail = stanza, mark, i;
	return nil;
end

local function hold_for(session)
	local kind = session.type;
	if type(kind) == "string" and kind:sub(1, 3) == "c2s" then
		filters.add_filter(session, "stanzas/out", hold_until_committed, HOLD_PRIORITY);
	end
end
-- Client sessions from now on (the filter looks at the host: it is not known yet), and those
-- already open: mod_c2s's (with mod_websocket's) and mod_bosh's. A session resumed by
-- mod_smacks takes the new connection's filters, so every client session has it, not only
-- those bound on this host.
filters.add_filter_hook(hold_for);
local open_sessions = { module:shared("/*/c2s/sessions"), module:shared("/*/bosh/sessions") };
for _, sessions in ipairs(open_sessions) do
	for _, session in pairs(sessions) do
		hold_for(session);
	end
end

-- A closing session's held stanzas go out before the stream ends, and those of a session going
-- away before mod_smacks looks at what it did not acknowledge, rather than not at all: their
-- rows are queued and committed within a batch.
local function flush_all_held(event)
	flush_held(event.session, true);
end
module:hook("pre-session-close", flush_all_held, 1000);
module:hook("pre-resource-unbind", flush_all_held, 1000);

-- Metrics (served by mod_http_openmetrics where it is loaded; README.md, Metrics). The native
-- side counts and times; update_metrics() adds what changed to these families, on each
-- statistics collection and every second in between, so that no collection has a long
-- backlog of histogram samples to add.
local buckets = native.metric_buckets;
local metrics = {
	archived = module:metric("counter", "archived", "", "Messages archived, by direction (in: to the user, out: from the user)", { "direction" });
	not_archived = module:metric("counter", "not_archived", "", "Messages not archived, by reason", { "reason" });
	queries = module:metric("counter", "queries", "", "Archive queries and metadata requests, by outcome", { "outcome" });
	query = module:metric("histogram", "query", "seconds", "Time from an archive query's arrival to its answer being ready", {}, { buckets = buckets.seconds });
	archive_messages = module:metric("gauge", "archive_messages", "", "Messages in this host's archives", {});
	archive_users = module:metric("gauge", "archive_users", "", "Users of this host with archived messages", {});
	database = module:metric("gauge", "database", "bytes", "Size of the archive database file, write-ahead log included", {});
	write_queue = module:metric("gauge", "write_queue", "", "Messages waiting to be written to the archive", {});
	batch_size = module:metric("histogram", "batch_size", "", "Messages per committed transaction", {}, { buckets = buckets.batch });
	commit = module:metric("histogram", "commit", "seconds", "Time to commit one transaction of messages", {}, { buckets = buckets.seconds });
	failed_writes = module:metric("counter", "failed_writes", "", "Failed attempts to commit messages (each retry counts)", {});
};
-- The reasons decided here rather than on the native side.
local not_archived_policy = metrics.not_archived:with_labels("policy");
local queries_refused = metrics.queries:with_labels("refused"); -- before a worker: counted here
local not_archived_prefs = metrics.not_archived:with_labels("prefs");
local not_archived_limit = metrics.not_archived:with_labels("limit");

local function update_metrics(refresh)
	for _, u in ipairs(archive:metrics(refresh)) do
		local metric = metrics[u.name]:with_labels(table.unpack(u.labels));
		if u.add then
			metric:add(u.add);
		elseif u.set then
			metric:set(u.set);
		else
			local samples = u.samples; -- value, count, value, count, ...
			for i = 1, #samples, 2 do
				for _ = 1, samples[i + 1] do metric:sample(samples[i]); end
			end
		end
	end
end

module:hook_global("stats-update", function () update_metrics(true); end);
if require "core.statsmanager".get_metric_registry() then
	update_metrics(true);
	module:add_timer(1, function ()
		if closed then return; end
		update_metrics(false);
		return 1;
	end);
end

-- Archive path (mod_mam.lua:390-472)

local function is_our_stanza_id(tag, user)
	if tag.name == "stanza-id" and tag.attr.xmlns == xmlns_st_id then
		local by_user, by_host, res = jid_prepped_split(tag.attr.by);
		return not res and by_host == host and by_user == user;
	end
	return false;
end

-- A new top element holding the same children, but the child elements `drop(child, user)`
-- picks. Nothing changes a message's child elements in place, so they need no copy: the deep
-- clones stock makes for the delivered copy and the sender's stripped copy were the largest
-- pieces of garbage of the archive path.
local function shallow_copy(stanza, drop, user)
	local copy = st.clone(stanza, true);
	local tags, n = copy.tags, 0;
	for i = 1, #stanza do
		local child = stanza[i];
		if type(child) ~= "table" then
			n = n + 1;
			copy[n] = child;
		elseif not (drop and drop(child, user)) then
			n = n + 1;
			copy[n] = child;
			tags[#tags + 1] = child;
		end
	end
	return copy;
end

-- A copy without the stanza-ids claiming to be ours (the stanza itself is left as it is, for
-- whoever holds it).
local function strip_stanza_id(stanza, user)
	if not stanza:get_child("stanza-id", xmlns_st_id) then return stanza; end
	return shallow_copy(stanza, is_our_stanza_id, user);
end

local function user_exists(user)
	return prosody.bare_sessions[user .. "@" .. host] ~= nil or um.user_exists(user, host);
end

-- Preferences (mamprefs.lib.lua), kept where stock mod_mam keeps them: the
-- <archive_store>_prefs keyval store, in Prosody's stored form ({ [false] = default,
-- [jid] = true|false }), cached on the user's bare session as `archive_prefs`. So prefs carry
-- over to and from stock, and mod_mam_adhoc (which writes through mod_mam/mamprefs) is seen.
local prefs_store = module:open_store(settings.archive_store .. "_prefs");
local user_sessions = prosody.hosts[host].sessions;
local offline_prefs = new_cache(1000); -- username -> stored prefs, or false for none
local stored_default = ({ always = true, never = false, roster = "roster" })[settings.default_archive_policy];
-- What users without stored prefs get, shared (never modified) so the archive path allocates
-- nothing for them.
local default_prefs = { [false] = stored_default };
local not_yet_enabled_prefs = { [false] = false };

local function load_prefs(user)
	local bare = user_sessions[user];
	local cached = bare and bare.archive_prefs;
	if cached then return cached; end
	cached = offline_prefs:get(user);
	if cached == nil then
		local stored, err = prefs_store:get(user);
		if err then
			module:log("error", "Could not load archive preferences of %s: %s", user, err);
			return nil;
		end
		cached = stored or false;
		offline_prefs:set(user, cached);
	end
	if bare and cached then bare.archive_prefs = cached; end
	return cached or nil;
end

local function set_prefs(user, prefs)
	local ok, err = prefs_store:set(user, prefs);
	if not ok then return nil, err; end
	offline_prefs:set(user, prefs or false);
	local bare = user_sessions[user];
	if bare then bare.archive_prefs = prefs; end
	return true;
end

-- `explicit`: the user's client just used MAM, which under mam_smart_enable persists the default.
local function get_prefs(user, explicit)
	local prefs = load_prefs(user);
	if prefs then return prefs; end
	if not settings.mam_smart_enable then
		return default_prefs;
	elseif explicit then
		prefs = { [false] = stored_default }; -- Stored and cached: its own table.
		set_prefs(user, prefs);
		return prefs;
	end
	return not_yet_enabled_prefs;
end

-- Others may write the store and the session cache directly (mod_mam_adhoc through
-- mod_mam/mamprefs): once the user's session goes, read the store again next time.
module:hook("pre-resource-unbind", function (event)
	offline_prefs:set(event.session.username, nil);
end);

local function shall_store(user, with)
	local prefs = get_prefs(user);
	local rule = prefs[with];
	if rule ~= nil then return rule; end
	local default = prefs[false];
	if default == "roster" then
		return rm_load_roster(user, host)[with] ~= nil;
	end
	return default == true or default == "always";
end

-- Smart retention: what each of a user's clients has received.
local smart_retention = settings.smart_retention_strategy ~= nil;

local function client_of(session)
	return session.client_id or session.resource;
end

-- The user's clients that are online now, and so receive a message archived now.
local function online_clients(user)
	local bare = user_sessions[user];
	local clients = {};
	for _, session in pairs(bare and bare.sessions or {}) do
		clients[#clients + 1] = client_of(session);
	end
	return clients;
end

-- Why a message was not stored, logged once per episode when the database cannot keep up
-- (the message is still delivered, without a stanza-id).
local queue_full = false;
local function not_archived(stanza, why, kind, log)
	if kind == "queue-full" then
		if not queue_full then
			queue_full = true;
			module:log("error", "Not archiving messages until the database catches up: %s", why);
		end
	elseif kind == "failed" then
		log("error", "Not archiving stanza: %s (%s)", stanza:top_tag(), why);
	else -- "empty" (expected), "too-deep" (a client's doing, possibly hostile), "unavailable"
		-- (the server has not answered since the start, logged then and when it does): no error line each.
		log("debug", "Not archiving stanza: %s (%s)", stanza:top_tag(), why);
	end
end

-- Appends our stanza-id to `stanza`, a top element this module made, and returns it. The
-- element is the table st.stanza makes, built directly: st.stanza checks the name and every
-- attribute with Lua patterns (control characters, UTF-8), 39,400 instructions a call under
-- callgrind against 3,900, for values that cannot fail them (a constant, a JID Prosody has
-- prepared, an id of ours), and the serialiser escapes attribute values anyway.
local stanza_mt = st.stanza_mt;
local function add_stanza_id(stanza, by, id)
	local stanza_id = setmetatable({ name = "stanza-id", attr = { xmlns = xmlns_st_id, by = by, id = id }, tags = {} },
		stanza_mt);
	stanza[#stanza + 1] = stanza_id;
	stanza.tags[#stanza.tags + 1] = stanza_id;
	return stanza_id;
end

-- Takes `user`'s stanza-ids out of `list` (an element's children, or its tags), in place.
local function drop_stanza_ids(list, user)
	local len, n = #list, 0;
	for i = 1, len do
		local child = list[i];
		if not (type(child) == "table" and is_our_stanza_id(child, user)) then
			n = n + 1;
			list[n] = child;
		end
	end
	for i = n + 1, len do list[i] = nil; end
end

-- Takes `child` out of `list` (an element's children, or its tags), in place.
local function remove_child(list, child)
	local n = #list;
	if list[n] == child then -- The usual case: nothing was appended after it.
		list[n] = nil;
		return;
	end
	for i = n - 1, 1, -1 do
		if list[i] == child then
			table.remove(list, i);
			return;
		end
	end
end

-- Takes our stanza-ids out of `stanza`, a top element this module made, in place: `added`, the
-- one this module put there, by identity; then, only where a stanza-id is left (another
-- handler's doing), those claiming to be the user's, whose JIDs need preparing to compare.
local function strip_own_stanza_id(stanza, user, added)
	if added then
		remove_child(stanza, added);
		remove_child(stanza.tags, added);
	end
	if stanza:get_child("stanza-id", xmlns_st_id) then
		drop_stanza_ids(stanza, user);
		drop_stanza_ids(stanza.tags, user);
	end
	if stanza.set_meta then stanza:set_meta("archive-id", nil); end
end

-- Archives the message for the sender (c2s) or the recipient and puts the tagged copy in the
-- event. Returns the id, the release mark and what archive-message-added needs; nil when the
-- message is not archived.
local function archive_message(event, c2s)
	local origin, stanza = event.origin, event.stanza;
	local log = c2s and origin.log or module._log;
	local orig_from = stanza.attr.from;
	local orig_to = stanza.attr.to or orig_from;
	-- jid.split's node and jid.bare, in one native call per JID instead of util.jid's
	-- pattern matches.
	local to_node, to_bare = jid_parts(orig_to);
	local store_user, with;
	if c2s then
		store_user, with = origin.username, to_bare;
	else
		local _, from_bare = jid_parts(orig_from);
		store_user, with = to_node, from_bare;
	end
	if not store_user or not with then return; end

	stanza = strip_stanza_id(stanza, store_user);
	event.stanza = stanza;

	local payload = { stanza = stanza; session = origin };
	if not module:fire_event("archive-should-store", payload) then
		log("debug", "Not archiving stanza: %s (%s)", stanza:top_tag(), payload.reason);
		not_archived_policy:add(1);
		return;
	end
	if settings.storage_archive_item_limit == 0 then
		log("debug", "Not archiving stanza: %s (storage_archive_item_limit is 0)", stanza:top_tag());
		not_archived_limit:add(1);
		return;
	end
	if not (c2s or user_exists(store_user)) or not shall_store(store_user, with) then
		log("debug", "Not archiving stanza: %s (prefs)", stanza:top_tag());
		not_archived_prefs:add(1);
		return;
	end

	local listened = host_events.get_handlers("archive-message-added");
	local id, release_at, why, stored, kind = archive:archive(stanza, store_user, with, listened and true,
		smart_retention and online_clients(store_user) or nil, c2s);
	if not id then
		not_archived(stanza, why, kind, log);
		return;
	end
	if queue_full then
		queue_full = false;
		module:log("info", "The archive caught up: archiving again");
	end
	-- The message goes on as a copy with our stanza-id (other handlers may hold the original),
	-- made once per event: the sender's copy, stripped in place at -1, comes to the recipient's
	-- handler of a local recipient with the same event, and takes the recipient's stanza-id.
	local delivered = stanza;
	if stanza ~= event.mam_rs_own then
		delivered = shallow_copy(stanza);
		event.mam_rs_own = delivered;
	end
	local added = add_stanza_id(delivered, store_user .. "@" .. host, id);
	if c2s then event.mam_rs_own_id = added; end -- For the sender's copy to lose at -1.
	if delivered.set_meta then -- Prosody 13+; modules such as mod_mam_smart_retention read it.
		delivered:set_meta("archive-id", id);
	end
	event.stanza = delivered;
	return id, release_at, listened and stored, store_user;
end

-- Archives the message; its delivery to clients is held until the row is committed (see
-- hold_until_committed). The handler itself waits only when the writer falls behind.
local function message_handler(event, c2s)
	if closed then return; end
	local origin = event.origin;
	local id, release_at, stored, store_user = archive_message(event, c2s);
	if not id then return; end
	if release_at > issued then issued = release_at; end
	if archive:backlogged() then
		wait_committed(release_at, origin);
	end
	if stored then
		-- Fired once the row is stored, as stock fires it after its append: a module that
		-- pushes a notification for it (mod_cloud_notify) sends the client to an archive that
		-- has it. While the database fails, rows are released uncommitted, and so is this (the
		-- rows stay queued until written).
		local function added()
			module:fire_event("archive-message-added", { origin = origin, stanza = stored, for_user = store_user, id = id });
		end
		if release_at <= released then
			added();
		else
			wait_for_mark(release_at, added);
		end
	end
end

local function c2s_message_handler(event)
	return message_handler(event, true);
end

-- Our stanza-id must not leave the server on the sender's outgoing copy. Our own copy only this
-- event holds (mod_carbons, at -0.5, sends clones of it) loses it in place; another is copied.
local function strip_stanza_id_after_other_events(event)
	local stanza, user = event.stanza, event.origin.username;
	if stanza == event.mam_rs_own then
		strip_own_stanza_id(stanza, user, event.mam_rs_own_id);
	else
		event.stanza = strip_stanza_id(stanza, user);
	end
end

module:hook("archive-should-store", function (event)
	local should, why = native.should_store(event.stanza);
	event.reason = why;
	return should;
end, -1);

module:hook("pre-message/bare", c2s_message_handler, 0);
module:hook("pre-message/full", c2s_message_handler, 0);
module:hook("message/bare", message_handler, 0);
module:hook("message/full", message_handler, 0);
module:hook("pre-message/bare", strip_stanza_id_after_other_events, -1);
module:hook("pre-message/full", strip_stanza_id_after_other_events, -1);

-- Archived messages count as handled when mod_offline did not take them (no bounce).
module:hook("message/offline/handle", function (event)
	local user = event.username .. "@" .. host;
	if event.stanza:get_child_with_attr("stanza-id", xmlns_st_id, "by", user) then
		return true;
	end
end, -2);

-- A client that queried the archive fetches its offline messages from there.
module:hook("message/offline/broadcast", function (event)
	if event.origin.mam_requested then
		return true;
	end
end);

-- Query path

-- Sends an answer from the native side: the result messages, then the iq reply. A large page
-- goes out a few messages per loop turn, each chunk built into stanzas just before it is sent
-- (c.results:take), so other sessions' stanzas (a ping) are never held behind a whole page of
-- building, serialising and writing. The next turn comes through our own eventfd
-- (archive:poke), not a timer: a zero timer waits for server_epoll's minimum of a millisecond
-- when no socket is ready. `done` runs after the reply.
local SEND_CHUNK = 10;
local function send_all(origin, stanzas)
	for i = 1, #stanzas do
		origin.send(stanzas[i]);
	end
end
local function send_answer(origin, stanza, c, done)
	if not c.results then
		origin.send(st.error_reply(stanza, c.error_type, c.condition, c.text));
		return;
	end
	local results = c.results;
	local function send_some()
		local chunk, remaining = results:take(SEND_CHUNK);
		answering = true; -- Archived results: not held, unless behind what is.
		local ok, err = pcall(send_all, origin, chunk);
		answering = false;
		if not ok then error(err, 0); end
		if remaining > 0 then
			return 0; -- The rest on the next loop turn.
		end
		origin.send(st.reply(stanza):add_child(c.payload));
		if done then done(); end
	end
	if send_some() then
		sending[send_some] = "now";
		archive:poke();
	end
end

module:hook("iq/self/" .. xmlns_mam .. ":prefs", function (event)
	if closed then return; end
	local origin, stanza = event.origin, event.stanza;
	local user = origin.username;
	if stanza.attr.type == "set" then
		local new_prefs, refused, condition = native.prefs_from_element(stanza.tags[1], settings.max_prefs_jids);
		if not new_prefs then
			origin.send(st.error_reply(stanza, "modify", condition, refused));
			return true;
		end
		local ok, err = set_prefs(user, new_prefs);
		if not ok then
			origin.send(st.error_reply(stanza, "cancel", "internal-server-error", "Error storing preferences: " .. tostring(err)));
			return true;
		end
	end
	origin.send(st.reply(stanza):add_child(archive:prefs_element(get_prefs(user, true))));
	return true;
end);

module:hook("iq-get/self/" .. xmlns_mam .. ":query", function (event)
	if closed then return; end
	get_prefs(event.origin.username, true);
	event.origin.send(st.reply(event.stanza):add_child(archive:query_form()));
	return true;
end);

-- Replies are sent from the completion callback, so the session is not paused meanwhile.
-- mam_rs_max_queries_per_second: per user, a token bucket (util.throttle) allowing a burst of
-- one second's worth.
local query_throttles = settings.max_queries_per_second and new_cache(10000);
local function over_query_rate(user)
	if not query_throttles then return false; end
	local throttle = query_throttles:get(user);
	if not throttle then
		throttle = require "util.throttle".create(settings.max_queries_per_second, 1);
		query_throttles:set(user, throttle);
	end
	return not throttle:poll(1);
end

module:hook("iq-set/self/" .. xmlns_mam .. ":query", function (event)
	if closed then return; end -- Unhandled: the client gets service-unavailable.
	local origin, stanza = event.origin, event.stanza;
	if over_query_rate(origin.username) then
		queries_refused:add(1);
		origin.send(st.error_reply(stanza, "wait", "resource-constraint",
			("Too many archive queries: at most %g per second"):format(settings.max_queries_per_second)));
		return true;
	end
	origin.mam_requested = true;
	get_prefs(origin.username, true);
	local start_time = time_now();
	local ticket, refused = archive:query(stanza.tags[1], origin.username, stanza.attr.from, stanza.attr.to);
	if not ticket then
		queries_refused:add(1);
		origin.send(st.error_reply(stanza, "modify", "bad-request", refused));
		return true;
	end
	pending[ticket] = function (c)
		send_answer(origin, stanza, c, function ()
			if smart_retention and c.mark_id and origin.username then
				archive:mark(origin.username, client_of(origin), c.mark_id);
			end
			module:fire_event("archive-query", { origin = origin, start_time = start_time, end_id = c.last_id });
		end);
	end;
	return true;
end);

module:hook("iq-get/self/" .. xmlns_mam .. ":metadata", function (event)
	if closed then return; end
	local origin, stanza = event.origin, event.stanza;
	pending[archive:metadata(origin.username)] = function (c)
		send_answer(origin, stanza, c);
	end;
	return true;
end);

-- Expiry (stock: mod_mam.lua:505-599, a daily job with one unbounded DELETE on the loop).
-- Here the writer thread removes expired messages in short batches between its commits.
local cleanup_running = 0;
-- Metrics (served by mod_http_openmetrics where it is loaded).
local cleanup_runs = module:metric("counter", "cleanup_runs", "", "Archive cleanup runs, by kind and outcome", { "kind", "outcome" });
local cleanup_removed = module:metric("counter", "cleanup_removed", "", "Messages removed by archive cleanup, by kind", { "kind" });
local cleanup_seconds = module:measure("cleanup", "times");

local function remove_expired()
	if closed then return; end
	if cleanup_running == 0 then
		local started = time_now();
		local timing = cleanup_seconds();
		for _, rule in ipairs(cleanup_rules(settings, started)) do
			cleanup_running = cleanup_running + 1;
			pending[archive:expire(rule[2], rule[3], rule[4])] = function (c)
				cleanup_running = cleanup_running - 1;
				if cleanup_running == 0 then timing(); end
				if c.expire_error then
					cleanup_runs:with_labels(rule[1], "failed"):add(1);
					module:log("error", "Removing %s messages failed: %s", rule[1], c.expire_error);
				else
					cleanup_runs:with_labels(rule[1], "done"):add(1);
					cleanup_removed:with_labels(rule[1]):add(c.expired);
					module:log(c.expired > 0 and "info" or "debug", "Deleted %d %s messages in %.3f s", c.expired, rule[1], time_now() - started);
				end
			end;
		end
	end
	return settings.cleanup_interval;
end

if settings.archive_expires_after or smart_retention then
	module:add_timer(math.min(settings.cleanup_interval, 60), remove_expired);
else
	module:log("debug", "Archive expiry disabled");
end

-- An account deleted (in band, or through the admin shell): its archive and its archiving
-- preferences go too. Stock mod_mam keeps them.
module:hook_global("user-deleted", function (event)
	if event.host ~= host or closed then return; end
	local user = event.username;
	local ok, err = set_prefs(user, nil);
	if not ok then
		module:log("error", "Could not remove the archiving preferences of deleted account %s@%s: %s", user, host, err);
	end
	pending[archive:delete_user(user)] = function (c)
		if c.expire_error then
			module:log("error", "Could not remove the archive of deleted account %s@%s: %s", user, host, c.expire_error);
		else
			module:log("info", "Removed the archive of deleted account %s@%s (%d messages)", user, host, c.expired);
		end
	end;
end);

module:hook("account-disco-info", function (event)
	local reply = event.reply or event.stanza;
	reply:tag("feature", { var = xmlns_mam }):up();
	reply:tag("feature", { var = xmlns_mam_ext }):up();
	reply:tag("feature", { var = xmlns_st_id }):up();
end);

-- Unload (reload, or the module removed): closing waits until this host's queries are answered
-- and its messages committed (the last host to close also joins the threads); the last drain
-- then sends those answers and releases the waiting deliveries.
function module.unload()
	closed = true;
	watcher:close();
	archive:close();
	on_readable();
	update_metrics(false);
	for send_some in pairs(sending) do -- Timers die with the module: finish these here.
		while send_some() do end
	end
	released = math.huge;
	release_waiting(); -- Every held stanza goes out.
	filters.remove_filter_hook(hold_for);
	for _, sessions in ipairs(open_sessions) do
		for _, session in pairs(sessions) do
			filters.remove_filter(session, "stanzas/out", hold_until_committed);
		end
	end
end
