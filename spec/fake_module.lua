-- A stand-in for Prosody's module API, enough to load lua/mod_mam_rs.lua under busted with
-- the real native library and Prosody's own util.* libraries.
--
--   local fake = require "fake_module";
--   local m = fake.load({ options = { default_archive_policy = "roster" } });
--   m.module, m.hooks, m.logs, m.watcher, m.env ...
--
-- Each load gets its own data directory (prosody.paths.data), so its own SQLite file and
-- its own engine. fake.cleanup() unloads every instance still loaded and removes the
-- directories.

-- The checkout this file is in (spec/..), as an absolute path, so a clone tests its own files.
local ROOT = os.getenv("MAM_RS_ROOT");
if not ROOT or ROOT == "" then
	ROOT = debug.getinfo(1, "S").source:match("^@(.*)/spec/[^/]*$") or ".";
	if ROOT:sub(1, 1) ~= "/" then
		local pwd = io.popen("pwd"):read("l");
		ROOT = ROOT == "." and pwd or (pwd .. "/" .. ROOT:gsub("^%./", ""));
	end
end
local PROSODY = os.getenv("PROSODY_LIB") or "/usr/lib/prosody";

package.path = package.path .. ";" .. PROSODY .. "/?.lua";
package.cpath = package.cpath .. ";" .. PROSODY .. "/?.so";

local events_lib = require "util.events";

local M = {};

M.SHIM = os.getenv("MAM_RS_SHIM") or (ROOT .. "/lua/mod_mam_rs.lua");
M.PLUGIN_DIR = os.getenv("MAM_RS_PLUGIN_DIR") or (ROOT .. "/build/plugins/mod_mam_rs");
M.SO_NAME = "mam_rs_native.so";

local instances = {};
local tempdirs = {};

function M.sh(cmd)
	local ok = os.execute(cmd);
	assert(ok, "command failed: " .. cmd);
end

function M.tempdir()
	local p = assert(io.popen("mktemp -d /tmp/mam_rs_spec.XXXXXX"));
	local dir = p:read("*l");
	p:close();
	assert(dir and dir ~= "", "mktemp -d failed");
	table.insert(tempdirs, dir);
	return dir;
end

function M.exists(path)
	local f = io.open(path, "rb");
	if f then f:close(); return true; end
	return false;
end

local function format(fmt, ...)
	local args = table.pack(...);
	for i = 1, args.n do
		if type(args[i]) ~= "string" and type(args[i]) ~= "number" then
			args[i] = tostring(args[i]);
		end
	end
	local ok, s = pcall(string.format, tostring(fmt), table.unpack(args, 1, args.n));
	return ok and s or tostring(fmt);
end

-- A session as mod_c2s would hand it: username, host, full_jid, send and log.
function M.session(username, host, resource)
	host = host or "localhost";
	resource = resource or "res";
	local session = {
		username = username, host = host, resource = resource,
		full_jid = username .. "@" .. host .. "/" .. resource,
		type = "c2s", sent = {}, logs = {},
	};
	function session.send(stanza)
		table.insert(session.sent, stanza);
		return true;
	end
	function session.log(level, fmt, ...)
		table.insert(session.logs, { level = level, message = format(fmt, ...) });
	end
	return session;
end

-- Loads the shim. opts:
--   options      module:get_option values (default: {})
--   host         module.host (default "localhost")
--   directory    module:get_directory() (default: the built plugin directory)
--   installer    prosody.paths.installer (default: nil)
--   data         prosody.paths.data (default: a new temporary directory)
--   process_type prosody.process_type (default "prosody")
--   users        set of existing user names for core.usermanager (default alice, bob)
--   rosters      user -> roster table for core.rostermanager (default {})
--   loaded       host -> set of module names for core.modulemanager.is_loaded
--   statistics   whether core.statsmanager has a metric registry (default: no)
--   shim         the shim file (default M.SHIM)
-- Returns the instance, or nil and the error when the shim raised one.
local stores = {};

function M.load(opts)
	opts = opts or {};
	local host = opts.host or "localhost";
	local options = opts.options or {};
	local users = opts.users or { alice = true, bob = true };
	local rosters = opts.rosters or {};
	local loaded = opts.loaded or {};

	local m = {
		hooks = {}, logs = {}, timers = {}, watchers = {}, loadlib_calls = {},
		events = events_lib.new(), options = options,
	};
	m.data = opts.data or M.tempdir();

	local mod = { host = host, name = "mam_rs" };
	m.module = mod;

	function mod:get_directory() return opts.directory or M.PLUGIN_DIR; end
	function mod:get_option(name, default)
		local v = options[name];
		if v == nil then return default; end
		return v;
	end
	function mod:get_option_path(name, default, parent)
		local value = self:get_option(name, default);
		if value == nil then return nil; end
		assert(type(value) == "string", "get_option_path: not a string");
		local base = m.env.prosody.paths[parent] or parent or self:get_directory();
		if value:sub(1, 1) == "/" then return value; end
		return base .. "/" .. value;
	end
	function mod:log(level, fmt, ...)
		table.insert(m.logs, { level = level, message = format(fmt, ...) });
	end
	mod._log = function (level, fmt, ...)
		table.insert(m.logs, { level = level, message = format(fmt, ...) });
	end
	function mod:hook(event, handler, priority)
		table.insert(m.hooks, { event = event, handler = handler, priority = priority });
		return m.events.add_handler(event, handler, priority);
	end
	function mod:fire_event(event, data)
		return m.events.fire_event(event, data);
	end
	-- Global events (prosody.events): m.global_events.fire_event("user-deleted", ...).
	m.global_events = events_lib.new();
	function mod:hook_global(event, handler, priority)
		table.insert(m.hooks, { event = event, handler = handler, priority = priority, global = true });
		return m.global_events.add_handler(event, handler, priority);
	end
	-- module:require("name") loads lua/name.lib.lua in the module's environment, as Prosody does.
	function mod:require(name)
		return assert(loadfile(ROOT .. "/lua/" .. name .. ".lib.lua", "t", m.env))();
	end
	-- Metrics, recorded: m.metrics[name][label1 .. "|" .. label2] = value (a counter's total, a
	-- gauge's value, or a histogram's list of samples); m.measures[name] = calls.
	m.metrics, m.measures = {}, {};
	function mod:metric(_, name)
		local family = {};
		m.metrics[name] = family;
		return {
			with_labels = function (_, ...)
				local key = table.concat({ ... }, "|");
				return {
					add = function (_, n) family[key] = (family[key] or 0) + n; end;
					set = function (_, v) family[key] = v; end;
					sample = function (_, v)
						family[key] = family[key] or {};
						table.insert(family[key], v);
					end;
				};
			end;
		};
	end
	function mod:measure(name)
		m.measures[name] = 0;
		return function ()
			return function () m.measures[name] = m.measures[name] + 1; end;
		end;
	end
	-- module:shared: mod_c2s's and mod_bosh's open sessions (opts.c2s_sessions, opts.bosh_sessions).
	local shared = { ["/*/c2s/sessions"] = opts.c2s_sessions or {}, ["/*/bosh/sessions"] = opts.bosh_sessions or {} };
	function mod:shared(path)
		return (assert(shared[path], "module:shared: unexpected " .. path));
	end
	function mod:add_timer(delay, fn)
		table.insert(m.timers, { delay = delay, fn = fn });
	end
	-- A keyval store in memory, shared by every load on the same data directory and host (as
	-- Prosody's storage outlives a module reload). opts.store_fails makes set() fail.
	m.user_sessions = opts.user_sessions or {};
	function mod:open_store(name)
		local key = m.data .. "|" .. host .. "|" .. name;
		local data = stores[key] or {};
		stores[key] = data;
		m.stores = m.stores or {};
		m.stores[name] = data;
		return {
			get = function (_, user) return data[user]; end;
			set = function (_, user, value)
				if opts.store_fails then return nil, "disk full"; end
				data[user] = value;
				return true;
			end;
		};
	end

	-- The requires the shim makes, faked.
	local server = {};
	function server.watchfd(fd, onreadable)
		local handle = { fd = fd, onreadable = onreadable, closed = false };
		function handle:close() self.closed = true; end
		table.insert(m.watchers, handle);
		m.watcher = handle;
		return handle;
	end
	package.loaded["net.server"] = server;
	package.loaded["core.usermanager"] = {
		user_exists = function (user, h) return h == host and users[user] == true; end;
	};
	package.loaded["core.rostermanager"] = {
		load_roster = function (user, h)
			assert(h == host, "load_roster: wrong host");
			return rosters[user] or {};
		end;
	};
	-- opts.statistics: Prosody collects statistics (a metric registry exists).
	package.loaded["core.statsmanager"] = {
		get_metric_registry = function () return opts.statistics and {} or nil; end;
	};
	package.loaded["core.modulemanager"] = {
		is_loaded = function (h, name) return loaded[h] ~= nil and loaded[h][name] == true; end;
	};

	-- package.loadlib, spied on: which paths the shim tried.
	local package_proxy = setmetatable({
		loadlib = function (path, sym)
			table.insert(m.loadlib_calls, path);
			return package.loadlib(path, sym);
		end;
	}, { __index = package });

	m.env = setmetatable({
		module = mod,
		package = package_proxy,
		prosody = {
			paths = { data = m.data, installer = opts.installer },
			process_type = opts.process_type or "prosody",
			bare_sessions = opts.bare_sessions or {},
			hosts = { [host] = { sessions = m.user_sessions, events = m.events, modules = opts.host_modules } },
		},
	}, { __index = _G });

	local chunk = assert(loadfile(opts.shim or M.SHIM, "t", m.env));
	local ok, err = pcall(chunk);
	if not ok then return nil, err, m; end

	m.database = m.data .. "/mam_rs.sqlite";
	table.insert(instances, m);

	-- The handler registered for event at priority (nil: the only one).
	function m.handler(event, priority)
		local found;
		for _, h in ipairs(m.hooks) do
			if h.event == event and (priority == nil or (h.priority or 0) == priority) then
				assert(not found, "more than one handler for " .. event);
				found = h.handler;
			end
		end
		return assert(found, "no handler for " .. event .. " at " .. tostring(priority));
	end

	function m.fire(event, data)
		return m.events.fire_event(event, data);
	end

	-- Runs the timers that are due on the next loop turn (delay 0), as the event loop would;
	-- a callback returning a number is scheduled again.
	function m.run_due_timers()
		local due = {};
		for i = #m.timers, 1, -1 do
			if m.timers[i].delay == 0 then
				table.insert(due, 1, table.remove(m.timers, i));
			end
		end
		for _, t in ipairs(due) do
			local again = t.fn();
			if again then table.insert(m.timers, { delay = again, fn = t.fn }); end
		end
		return #due;
	end

	-- Polls the eventfd's watcher (and runs due timers) until done() holds (about 5 s at most).
	function m.wait_for(done, tries)
		for _ = 1, tries or 100 do
			if done() then return true; end
			os.execute("sleep 0.05");
			m.watcher.onreadable(m.watcher);
			while m.run_due_timers() > 0 do end
		end
		return done() and true or false;
	end

	function m.unload()
		if m.unloaded then return; end
		m.unloaded = true;
		if mod.unload then mod.unload(); end
	end

	function m.logged(level, pattern)
		local n = 0;
		for _, l in ipairs(m.logs) do
			if (level == nil or l.level == level) and l.message:find(pattern, 1, true) then
				n = n + 1;
			end
		end
		return n;
	end

	return m;
end

function M.cleanup()
	for _, m in ipairs(instances) do
		pcall(m.unload);
	end
	instances = {};
	for _, dir in ipairs(tempdirs) do
		os.execute("rm -rf '" .. dir .. "'");
	end
	tempdirs = {};
end

return M;
