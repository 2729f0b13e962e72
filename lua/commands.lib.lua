-- prosodyctl mod_mam_rs <command>: the admin commands, run in the prosodyctl process,
-- beside a running Prosody or not. Loaded by mod_mam_rs.lua with module:require("commands").
--
-- This file parses arguments, reads stock mod_mam's archive through Prosody's own storage
-- utilities (util.sql for mod_storage_sql, util.datamanager for internal storage), prints
-- progress, and hands everything else to the native library.

local jid = require "util.jid";
local st = require "util.stanza";
local datetime = require "util.datetime";
local time_now = require "util.time".now;
local configmanager = require "core.configmanager";
-- util.datamanager itself: core.storagemanager redirects its functions to the storage drivers,
-- and inside prosodyctl no driver is active. (Required when a command runs, not at load.)
local function datamanager()
	return require "core.storagemanager".olddm or require "util.datamanager";
end

return function (native, read_options)

local usage = [[
Usage: prosodyctl mod_mam_rs <command> [arguments]
  import [host] [user@host]              copy stock mod_mam's archive here, keeping every id
  import user@host --file PATH           import a file written by export
  info [host]                            users, messages, bytes, oldest and newest per host
  user_stats user@host                   one user's archive, with the busiest contacts
  export user@host [--format json|xml] [--output PATH]
                                         one user's archive (default: JSON to stdout)
  delete_user_data user@host             remove a user's archive and archiving preferences
  optimize [host]                        check indexes, ANALYZE, VACUUM, checkpoint the WAL
  cleanup [host]                         remove expired messages now (archive_expires_after)]];

-- Hosts whose modules_enabled has mam_rs.
local function hosts_with_this_module()
	local found = {};
	for name, config in pairs(configmanager.getconfig()) do
		local ctx = name ~= "*" and not config.component_module and module:context(name);
		if ctx and ctx:get_option_set("modules_enabled", {}):contains("mam_rs")
			and not ctx:get_option_set("modules_disabled", {}):contains("mam_rs") then
			table.insert(found, name);
		end
	end
	table.sort(found);
	return found;
end

local function fail(fmt, ...)
	print(fmt:format(...));
	return 1;
end

-- Splits arguments into positionals and --options (each option takes one value).
local function parse_args(arg, allowed)
	local positional, options = {}, {};
	local i = 2;
	while arg[i] do
		local a = arg[i];
		local name = a:match("^%-%-(.+)$");
		if name then
			if not allowed[name] then
				return nil, ("Unknown option %s for %s (known: %s)"):format(a, arg[1],
					next(allowed) and "--" .. table.concat((function ()
						local names = {}; for k in pairs(allowed) do names[#names + 1] = k; end
						table.sort(names); return names;
					end)(), ", --") or "none");
			end
			if arg[i + 1] == nil then
				return nil, ("Option %s needs a value"):format(a);
			end
			options[name] = arg[i + 1];
			i = i + 2;
		else
			positional[#positional + 1] = a;
			i = i + 1;
		end
	end
	return positional, options;
end

-- The host settings as the running module reads them.
local function settings_of(host)
	local s, lines = native.parse_config(read_options(module:context(host)));
	for _, line in ipairs(lines) do print(host .. ": " .. line.message); end
	return s;
end

-- Checks a user@host argument: the host must have mam_rs. Returns username, host.
local function user_arg(value, command)
	if not value then
		return nil, ("%s needs a user@host argument"):format(command);
	end
	local node, host = jid.prepped_split(value);
	if not node or not host or value:find("/", 1, true) then
		return nil, ("%q is not a valid user@host JID"):format(value);
	end
	if not require "util.set".new(hosts_with_this_module()):contains(host) then
		return nil, ("%q: no VirtualHost %q with mam_rs in modules_enabled"):format(value, host);
	end
	return node, host;
end

-- The hosts a command acts on: the one named (which must have mam_rs), or all.
local function hosts_arg(only_host)
	local targets = hosts_with_this_module();
	if only_host then
		if not require "util.set".new(targets):contains(only_host) then
			return nil, ("No VirtualHost %q with mam_rs in modules_enabled (found: %s)")
				:format(only_host, table.concat(targets, ", "));
		end
		return { only_host };
	end
	if #targets == 0 then
		return nil, "No VirtualHost has mam_rs in modules_enabled";
	end
	return targets;
end

-- The arguments of command arg[1]: the `allowed` --options, and positionals of one `shape`:
-- "user" (exactly one user@host) or "host" (at most one host). Returns positional, options;
-- or nil and what is wrong.
local function command_args(arg, allowed, shape)
	local positional, options = parse_args(arg, allowed);
	if not positional then return nil, options; end
	if shape == "user" and #positional ~= 1 then
		return nil, ("%s needs exactly one user@host argument"):format(arg[1]);
	elseif shape == "host" and #positional > 1 then
		return nil, ("%s takes at most one host"):format(arg[1]);
	end
	return positional, options;
end

-- For commands on one user: username, host (checked by user_arg); or nil and what is wrong.
local function user_of(arg)
	local positional, err = command_args(arg, {}, "user");
	if not positional then return nil, err; end
	return user_arg(positional[1], arg[1]);
end

-- For commands on [host]: the hosts to act on; or nil and what is wrong.
local function hosts_of(arg)
	local positional, err = command_args(arg, {}, "host");
	if not positional then return nil, err; end
	return hosts_arg(positional[1]);
end

-- The host's archive database, as the module opens it; `s` are its settings when already read.
local function open_db(host, create, s)
	s = s or settings_of(host);
	local db, err = native.admin(read_options(module:context(host)), create);
	return db, err, s;
end

local function micros(t) return math.floor(t * 1e6); end

------------------------------------------------------------------------------------------
-- cleanup

-- What one cleanup removes under host settings `hs`: by age, then (smart retention) what the
-- user's clients have. Each rule: { name, end, strategy, seen_since } for archive:expire.
local function cleanup_rules(hs, now)
	local rules = {};
	if hs.archive_expires_after then
		rules[#rules + 1] = { "expired", micros(now - hs.archive_expires_after) };
	end
	if hs.smart_retention_strategy then
		-- Clients unseen for longer than the expiry period no longer hold messages back.
		local seen_since = hs.archive_expires_after and micros(now - hs.archive_expires_after) or 0;
		rules[#rules + 1] = { "delivered", micros(now - hs.smart_retention_min), hs.smart_retention_strategy, seen_since };
	end
	return rules;
end

local function cleanup_host(name)
	local host_settings = settings_of(name);
	local started = time_now();
	local rules = cleanup_rules(host_settings, started);
	if #rules == 0 then
		print(name .. ": expiry is disabled (archive_expires_after), nothing to remove");
		return true;
	end
	local db, err = open_db(name, false, host_settings);
	if not db then
		if err:match("^no archive database") then
			print(("%s: %s, nothing to remove"):format(name, err));
			return true;
		end
		print(("%s: cleanup failed: %s"):format(name, err));
		return false;
	end
	for _, rule in ipairs(rules) do
		print(("%s: removing %s messages from before %s"):format(name, rule[1],
			os.date("!%Y-%m-%d %H:%M:%S UTC", rule[2] // 1000000)));
		local ok, removed = pcall(db.expire, db, name, host_settings.archive_store,
			function (n)
				io.write(("\r  %d messages removed (%.0f/s)"):format(n, n / math.max(time_now() - started, 1e-3)));
				io.flush();
			end, rule[2], rule[3], rule[4]);
		if not ok then
			print(("\n%s: cleanup failed: %s"):format(name, tostring(removed)));
			return false;
		end
		print(("\n%s: removed %d %s messages in %.1f s"):format(name, removed, rule[1], time_now() - started));
	end
	return true;
end

------------------------------------------------------------------------------------------
-- Reading stock mod_mam's archive, as its storage driver would (core/storagemanager.lua).

local function storage_driver(host, store)
	local storage = configmanager.get(host, "storage");
	local name;
	if type(storage) == "string" then
		name = storage;
	elseif type(storage) == "table" then
		name = storage[store];
	end
	name = name or configmanager.get(host, "default_storage") or "internal";
	if name == "sql2" then name = "sql"; end
	return name;
end

-- mod_storage_sql's connection parameters (normalize_params there).
local function sql_params(host)
	local params = configmanager.get(host, "sql") or { driver = "SQLite3", database = "prosody.sqlite" };
	if not params.driver then
		return nil, "the sql option has no driver";
	end
	local database = params.database;
	if params.driver == "SQLite3" and database ~= ":memory:" then
		database = configmanager.resolve_relative_path(prosody.paths.data or ".", database or "prosody.sqlite");
	end
	return {
		driver = params.driver, database = database, username = params.username,
		password = params.password, host = params.host, port = params.port,
	};
end

local PAGE = 1000;

-- A source: users(), count(user), rows(user, after_position) -> { {position, row}... }.
local function sql_source(host, store)
	local params, err = sql_params(host);
	if not params then return nil, err; end
	if params.driver == "SQLite3" and not require "lfs".attributes(params.database, "mode") then
		return nil, ("no database file %s"):format(params.database);
	end
	local engine = require "util.sql":create_engine(params);
	local ok, cerr = engine:connect();
	if not ok then
		return nil, ("cannot connect to the %s database %s: %s"):format(params.driver, params.database, tostring(cerr));
	end
	if params.driver == "SQLite3" then
		-- The running server may be writing the file (Prosody 13's mod_cron records its runs
		-- there a second after start): a read waits up to 10 s for its lock instead of failing
		-- the user's import at once with "database is locked".
		engine:execute("PRAGMA busy_timeout=10000");
	end
	-- Each read in its own transaction (committed), as mod_storage_sql does: LuaDBI opens one
	-- implicitly, and on PostgreSQL one failed statement would poison every later one.
	local function select(sql, ...)
		local args = table.pack(...);
		local ok, iter = engine:transaction(function ()
			return engine:select(sql, table.unpack(args, 1, args.n));
		end);
		if not ok then error(("reading %s: %s"):format(params.database, tostring(iter)), 0); end
		return iter;
	end
	local source = { name = "sql", where = ("%s database %s"):format(params.driver, params.database) };
	function source.users()
		local users = {};
		for row in select([[SELECT DISTINCT "user" FROM "prosodyarchive" WHERE "host"=? AND "store"=?]], host, store) do
			users[#users + 1] = row[1];
		end
		table.sort(users);
		return users;
	end
	function source.count(user)
		for row in select([[SELECT COUNT(*) FROM "prosodyarchive" WHERE "host"=? AND "user"=? AND "store"=?]],
			host, user, store) do
			return tonumber(row[1]);
		end
		return 0;
	end
	function source.rows(user, after)
		local page = {};
		for row in select([[SELECT "sort_id","key","when","with","type","value" FROM "prosodyarchive"
			WHERE "host"=? AND "user"=? AND "store"=? AND "sort_id">? ORDER BY "sort_id" LIMIT ]] .. PAGE,
			host, user, store, after) do
			page[#page + 1] = { tonumber(row[1]), { key = row[2], when = tonumber(row[3]), with = row[4], type = row[5], value = row[6] } };
		end
		return page;
	end
	return source;
end

local function internal_source(host, store)
	local dm = datamanager();
	local source = { name = "internal", where = ("files under %s"):format(prosody.paths.data) };
	local loaded = {};
	local function load(user)
		if loaded.user ~= user then
			local items, err = dm.list_load(user, host, store);
			if not items and err then
				error(("cannot read its .list file (%s); see the log above"):format(err), 0);
			end
			loaded = { user = user, items = items or {} };
		end
		return loaded.items;
	end
	function source.users()
		local users = {};
		for user in dm.users(host, store, "list") do users[#users + 1] = user; end
		table.sort(users);
		return users;
	end
	function source.count(user)
		return #load(user);
	end
	function source.rows(user, after)
		local items, page = load(user), {};
		for i = after + 1, math.min(after + PAGE, #items) do
			local item = items[i];
			local row = { key = item.key or tostring(i), when = item.when, with = item.with, type = "xml" };
			local attr = type(item.attr) == "table" and item.attr or {};
			if not row.when and attr.stamp then
				row.when = datetime.parse(attr.stamp);
			end
			-- mod_storage_internal's own clean-up before rebuilding the stanza (INT:216-223).
			item.key, item.when, item.with, attr.stamp, attr.stamp_legacy = nil, nil, nil, nil, nil;
			local ok, stanza = pcall(st.deserialize, item);
			row.value = ok and stanza and tostring(stanza) or "";
			page[#page + 1] = { i, row };
		end
		return page;
	end
	return source;
end

local function open_source(host, store)
	local driver = storage_driver(host, store);
	if driver == "sql" then
		return sql_source(host, store);
	elseif driver == "internal" then
		return internal_source(host, store);
	end
	return nil, ("stock mod_mam would keep the %q store in %q storage, which cannot be imported (sql or internal)")
		:format(store, driver);
end

local function duration(seconds)
	seconds = math.floor(seconds + 0.5);
	return ("%d:%02d:%02d"):format(seconds // 3600, seconds % 3600 // 60, seconds % 60);
end

local function import_host(host, only_user, totals)
	local db, err, s = open_db(host, true);
	if not db then print(("%s: %s"):format(host, err)); return false; end
	local store = s.archive_store;
	local source, serr = open_source(host, store);
	if not source then print(("%s: nothing imported: %s"):format(host, serr)); return false; end
	local users = only_user and { only_user } or source.users();
	print(("%s: importing the %q archives of %d users from %s into %s"):format(host, store, #users, source.where, db:path()));
	-- Every run reads the whole source: a row imported before is recognised by its id (and
	-- counted as already there), so an interrupted run is simply run again, and the summary
	-- is exact. The checkpoint only tells the admin an earlier run happened.
	local todo, resumed = 0, 0;
	for _, user in ipairs(users) do
		if db:checkpoint(host, store, user, source.name) then resumed = resumed + 1; end
		local ok, n = pcall(source.count, user);
		todo = todo + (ok and n or 0);
	end
	if resumed > 0 then
		print(("%s: %d of these archives were imported before; their messages are recognised, not copied again")
			:format(host, resumed));
	end
	local started, done = time_now(), 0;
	local function progress()
		local elapsed = math.max(time_now() - started, 1e-3);
		local rate = done / elapsed;
		local eta = rate > 0 and duration((todo - done) / rate) or "?";
		io.write(("\r  %d of %d messages (%d%%), %.0f/s, ETA %s   "):format(done, todo,
			todo > 0 and math.floor(done * 100 / todo) or 100, rate, eta));
		io.flush();
	end
	for _, user in ipairs(users) do
		totals.users = totals.users + 1;
		local after = 0;
		while true do
			local ok, page = pcall(source.rows, user, after);
			if not ok then
				table.insert(totals.skipped, ("  skipped %s@%s: %s"):format(user, host, page));
				break;
			end
			if #page == 0 then break; end
			local rows = {};
			for i, entry in ipairs(page) do rows[i] = entry[2]; end
			local position = page[#page][1];
			local imported, already, skipped = db:import(host, store, user, source.name, rows, position);
			totals.messages = totals.messages + imported;
			totals.already = totals.already + already;
			for _, s in ipairs(skipped) do
				table.insert(totals.skipped, ("  skipped %s@%s %s: %s"):format(user, host, s.key, s.reason));
			end
			done = done + #page;
			after = position;
			progress();
		end
	end
	progress();
	print(("\n%s: done in %.1f s"):format(host, time_now() - started));
	return true;
end

local function print_summary(totals)
	print(("import summary: users=%d messages=%d already=%d skipped=%d"):format(
		totals.users, totals.messages, totals.already, #totals.skipped));
	for _, line in ipairs(totals.skipped) do print(line); end
end

local commands = {};

function commands.import(arg)
	local positional, options = parse_args(arg, { file = true });
	if not positional then return fail("%s", options); end
	if #positional > 2 then return fail("import takes at most a host and a user@host (got %d arguments)", #positional); end
	local totals = { users = 0, messages = 0, already = 0, skipped = {} };
	if options.file then
		if #positional ~= 1 then return fail("import --file needs exactly one user@host argument"); end
		local user, host = user_arg(positional[1], "import --file");
		if not user then return fail("%s", host); end
		local db, err, s = open_db(host, true);
		if not db then return fail("%s: %s", host, err); end
		local imported, already, skipped, ferr = db:import_file(host, s.archive_store, user, options.file);
		if not imported then return fail("import --file: %s", ferr); end
		totals.users, totals.messages, totals.already = 1, imported, already;
		for _, sk in ipairs(skipped) do
			table.insert(totals.skipped, ("  skipped %s@%s %s: %s"):format(user, host, sk.key, sk.reason));
		end
		print_summary(totals);
		return 0;
	end
	local only_host, only_user;
	for _, a in ipairs(positional) do
		if a:find("@", 1, true) then
			local user, host = user_arg(a, "import");
			if not user then return fail("%s", host); end
			if only_host and only_host ~= host then return fail("%s is not on host %s", a, only_host); end
			only_user, only_host = user, host;
		else
			if only_host and only_host ~= a then return fail("%s is not on host %s", only_user .. "@" .. only_host, a); end
			only_host = a;
		end
	end
	local targets, err = hosts_arg(only_host);
	if not targets then return fail("%s", err); end
	local ok = true;
	for _, host in ipairs(targets) do
		ok = import_host(host, only_user, totals) and ok;
	end
	print_summary(totals);
	return ok and 0 or 1;
end

function commands.info(arg)
	local targets, err = hosts_of(arg);
	if not targets then return fail("%s", err); end
	for _, host in ipairs(targets) do
		local db, derr, s = open_db(host, false);
		if not db then
			print(("%s: 0 users, 0 messages, 0 bytes, oldest -, newest - (%s)"):format(host, derr));
		else
			local t = db:stats(host, s.archive_store);
			print(("%s: %d users, %d messages, %d bytes, oldest %s, newest %s"):format(host, t.users, t.messages,
				t.bytes, t.oldest or "-", t.newest or "-"));
		end
	end
	return 0;
end

function commands.user_stats(arg)
	local user, host = user_of(arg);
	if not user then return fail("%s", host); end
	local db, err, s = open_db(host, false);
	if not db then return fail("%s: %s", host, err); end
	local t = db:stats(host, s.archive_store, user);
	print(("%s@%s: %d messages, %d bytes, oldest %s, newest %s"):format(user, host, t.messages, t.bytes,
		t.oldest or "-", t.newest or "-"));
	for _, c in ipairs(t.contacts) do
		print(("  with %s: %s"):format(c[1] ~= "" and c[1] or "(none)", c[2]));
	end
	return 0;
end

function commands.export(arg)
	local positional, options = command_args(arg, { format = true, output = true }, "user");
	if not positional then return fail("%s", options); end
	local format = options.format or "json";
	if format ~= "json" and format ~= "xml" then
		return fail("Unknown --format %q for export (json or xml)", format);
	end
	local user, host = user_arg(positional[1], "export");
	if not user then return fail("%s", host); end
	local db, err, s = open_db(host, false);
	if not db then return fail("%s: %s", host, err); end
	local n, eerr = db:export(host, s.archive_store, user, format, options.output);
	if not n then return fail("export: %s", eerr); end
	if options.output then
		print(("Exported %d messages of %s@%s to %s (%s)"):format(n, user, host, options.output, format));
	end
	return 0;
end

-- Archiving preferences live in Prosody's own archive_prefs store (as stock keeps them).
local function delete_prefs(user, host)
	local driver = storage_driver(host, "archive_prefs");
	if driver == "internal" then
		local ok, err = datamanager().store(user, host, "archive_prefs", nil);
		return ok, err;
	elseif driver == "sql" then
		local params, err = sql_params(host);
		if not params then return nil, err; end
		local engine = require "util.sql":create_engine(params);
		local ok, cerr = engine:connect();
		if not ok then return nil, cerr; end
		return engine:transaction(function ()
			return engine:delete([[DELETE FROM "prosody" WHERE "host"=? AND "user"=? AND "store"=?]],
				host, user, "archive_prefs");
		end);
	end
	return nil, ("preferences are in %q storage, not removed"):format(driver);
end

function commands.delete_user_data(arg)
	local user, host = user_of(arg);
	if not user then return fail("%s", host); end
	local db, err, s = open_db(host, false);
	local removed = 0;
	if db then
		removed = db:delete_user(host, s.archive_store, user);
	elseif not err:match("^no archive database") then
		return fail("%s: %s", host, err);
	end
	local ok, perr = delete_prefs(user, host);
	print(("%s@%s: removed %d messages; archiving preferences %s"):format(user, host, removed,
		ok and "removed" or ("not removed: " .. tostring(perr))));
	return ok and 0 or 1;
end

function commands.optimize(arg)
	local targets, err = hosts_of(arg);
	if not targets then return fail("%s", err); end
	local done = {};
	for _, host in ipairs(targets) do
		local db, derr, s = open_db(host, false);
		if not db then return fail("%s: %s", host, derr); end
		if not done[s.database] then
			done[s.database] = true;
			print(("%s: optimizing %s (archiving pauses during VACUUM; nothing is lost)"):format(host, s.database));
			local lines, oerr = db:optimize(true);
			if not lines then return fail("optimize: %s: %s", s.database, oerr); end
			for _, line in ipairs(lines) do print("  " .. line); end
		end
	end
	print("optimize: ok");
	return 0;
end

function commands.cleanup(arg)
	local targets, err = hosts_of(arg);
	if not targets then return fail("%s", err); end
	local ok = true;
	for _, name in ipairs(targets) do
		ok = cleanup_host(name) and ok;
	end
	return ok and 0 or 1;
end

return function (arg)
	local command = arg[1];
	local run = command and commands[command];
	if not run then
		print(usage);
		if command and command ~= "help" and command ~= "--help" then
			print(("\nUnknown command %q"):format(command));
			return 1;
		end
		return 0;
	end
	return run(arg);
end, cleanup_rules;

end
