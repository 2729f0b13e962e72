-- Specs for the Lua shim (lua/mod_mam_rs.lua), run against the real native library
-- (build/plugins/mod_mam_rs/mam_rs_native.so) and Prosody's util libraries, with a fake
-- `module` (spec/fake_module.lua). Run: make test-spec

local fake = require "fake_module";
local st = require "util.stanza";

local XMLNS_MAM = "urn:xmpp:mam:2";
local XMLNS_SID = "urn:xmpp:sid:0";
local XMLNS_CHATSTATES = "http://jabber.org/protocol/chatstates";
local XMLNS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas";

local counter = 0;
-- Whether the module's eventfd is readable now (Prosody's own epoll binding, no waiting).
local function fd_readable(m)
	local poller = require "util.poll".new();
	assert(poller:add(m.watcher.fd, true, false));
	local fd = poller:wait(0);
	poller:del(m.watcher.fd);
	return fd == m.watcher.fd;
end

local function chat(from, to, body)
	counter = counter + 1;
	local m = st.message({ from = from, to = to, type = "chat", id = "msg" .. counter });
	if body then m:text_tag("body", body); end
	return m;
end

local function chat_state(from, to)
	return chat(from, to):tag("active", { xmlns = XMLNS_CHATSTATES }):up();
end

local function stanza_ids(stanza)
	local found = {};
	for tag in stanza:childtags("stanza-id", XMLNS_SID) do
		table.insert(found, tag);
	end
	return found;
end

local function query_iq(id, queryid)
	return st.iq({ type = "set", id = id, from = "alice@localhost/res", to = "alice@localhost" })
		:tag("query", { xmlns = XMLNS_MAM, queryid = queryid }):up();
end

-- Sends alice -> bob messages through the c2s archive handler (pre-message/bare at 0).
local function archive_from_alice(m, bodies)
	local handler = m.handler("pre-message/bare", 0);
	local ids = {};
	for _, body in ipairs(bodies) do
		local event = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", body) };
		handler(event);
		local sid = assert(stanza_ids(event.stanza)[1], "not archived: " .. body);
		table.insert(ids, sid.attr.id);
	end
	return ids;
end

-- Runs a query and waits for its final iq; returns the stanzas sent to the session.
local function run_query(m, iq)
	local session = fake.session("alice");
	local handled = m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = session, stanza = iq });
	assert.is_true(handled);
	local function finished()
		local last = session.sent[#session.sent];
		return last ~= nil and last.name == "iq";
	end
	assert.is_true(m.wait_for(finished), "no reply to the query");
	return session.sent, session;
end

-- Sends a prefs iq (get, or set with `prefs`) and returns the reply.
local function prefs_iq(m, prefs, session)
	session = session or fake.session("alice");
	local iq = st.iq({ type = prefs and "set" or "get", id = "p1", from = "alice@localhost/res" });
	iq:add_child(prefs or st.stanza("prefs", { xmlns = XMLNS_MAM }));
	assert.is_true(m.fire("iq/self/" .. XMLNS_MAM .. ":prefs", { origin = session, stanza = iq }));
	return session.sent[#session.sent];
end

local function prefs_el(default, always, never)
	local p = st.stanza("prefs", { xmlns = XMLNS_MAM, default = default }):tag("always");
	for _, j in ipairs(always or {}) do p:text_tag("jid", j); end
	p:up():tag("never");
	for _, j in ipairs(never or {}) do p:text_tag("jid", j); end
	return p:up();
end

local function jids(reply, list)
	local found = {};
	for j in reply:get_child("prefs", XMLNS_MAM):get_child(list):childtags("jid") do
		table.insert(found, j:get_text());
	end
	table.sort(found);
	return found;
end

local function load(opts)
	local m, err = fake.load(opts);
	assert(m, err);
	return m;
end

describe("mod_mam_rs shim", function ()
	after_each(function ()
		fake.cleanup();
	end);

	describe("loading the native library", function ()
		local saved;
		before_each(function ()
			saved = package.loaded.mam_rs_native;
			package.loaded.mam_rs_native = nil;
		end);
		after_each(function ()
			package.loaded.mam_rs_native = saved;
		end);

		it("loads the .so from module:get_directory()", function ()
			local empty = fake.tempdir();
			local m = load({ installer = empty });
			assert.same({ fake.PLUGIN_DIR .. "/" .. fake.SO_NAME }, m.loadlib_calls);
			assert.is_table(package.loaded.mam_rs_native);
			assert.is_string(package.loaded.mam_rs_native.version);
			assert.is_table(m.watcher);
		end);

		it("falls back to prosody.paths.installer .. /lib/lua/5.4/", function ()
			local empty = fake.tempdir();
			local installer = fake.tempdir();
			fake.sh("mkdir -p '" .. installer .. "/lib/lua/5.4'");
			fake.sh("ln -s '" .. fake.PLUGIN_DIR .. "/" .. fake.SO_NAME .. "' '" .. installer .. "/lib/lua/5.4/" .. fake.SO_NAME .. "'");
			local m = load({ directory = empty, installer = installer });
			assert.same({
				empty .. "/" .. fake.SO_NAME,
				installer .. "/lib/lua/5.4/" .. fake.SO_NAME,
			}, m.loadlib_calls);
			assert.is_table(package.loaded.mam_rs_native);
			assert.is_table(m.watcher);
		end);

		it("fails naming every path tried when neither has it", function ()
			local empty = fake.tempdir();
			local installer = fake.tempdir();
			local m, err = fake.load({ directory = empty, installer = installer });
			assert.is_nil(m);
			err = tostring(err);
			assert.truthy(err:find("cannot load mam_rs_native.so", 1, true), err);
			assert.truthy(err:find(empty .. "/" .. fake.SO_NAME, 1, true), err);
			assert.truthy(err:find(installer .. "/lib/lua/5.4/" .. fake.SO_NAME, 1, true), err);
			assert.is_nil(package.loaded.mam_rs_native);
		end);

		it("without an installer path tries only module:get_directory()", function ()
			local empty = fake.tempdir();
			local m, err = fake.load({ directory = empty });
			assert.is_nil(m);
			assert.truthy(tostring(err):find(empty .. "/" .. fake.SO_NAME, 1, true), err);
		end);
	end);

	describe("hooks", function ()
		it("are those of stock mod_mam, at the same priorities", function ()
			local m = load();
			local got = {};
			for _, h in ipairs(m.hooks) do
				got[h.event .. " @ " .. tostring(h.priority or 0)] = (got[h.event .. " @ " .. tostring(h.priority or 0)] or 0) + 1;
			end
			assert.same({
				["pre-message/bare @ 0"] = 1,
				["pre-message/full @ 0"] = 1,
				["pre-message/bare @ -1"] = 1,
				["pre-message/full @ -1"] = 1,
				["message/bare @ 0"] = 1,
				["message/full @ 0"] = 1,
				["archive-should-store @ -1"] = 1,
				["message/offline/handle @ -2"] = 1,
				["message/offline/broadcast @ 0"] = 1,
				["iq-get/self/urn:xmpp:mam:2:query @ 0"] = 1,
				["iq-set/self/urn:xmpp:mam:2:query @ 0"] = 1,
				["iq/self/urn:xmpp:mam:2:prefs @ 0"] = 1,
				["iq-get/self/urn:xmpp:mam:2:metadata @ 0"] = 1,
				["account-disco-info @ 0"] = 1,
				-- Ours: forget cached prefs when a session goes (mod_mam_adhoc writes the store).
				["pre-resource-unbind @ 0"] = 1,
				-- Ours: a closing or departing session's held deliveries go out first.
				["pre-session-close @ 1000"] = 1,
				["pre-resource-unbind @ 1000"] = 1,
				-- Ours: an account deleted takes its archive and prefs with it.
				["user-deleted @ 0"] = 1,
				-- Ours: metrics brought up to date when Prosody collects statistics.
				["stats-update @ 0"] = 1,
			}, got);
		end);

		it("account-disco-info adds mam:2, mam:2#extended and sid:0 in that order", function ()
			local m = load();
			local reply = st.stanza("query", { xmlns = "http://jabber.org/protocol/disco#info" });
			m.fire("account-disco-info", { reply = reply });
			local vars = {};
			for tag in reply:childtags("feature") do table.insert(vars, tag.attr.var); end
			assert.same({ XMLNS_MAM, "urn:xmpp:mam:2#extended", XMLNS_SID }, vars);

			local stanza = st.stanza("query", { xmlns = "http://jabber.org/protocol/disco#info" });
			m.fire("account-disco-info", { stanza = stanza });
			assert.equal(3, #stanza.tags);
		end);

		it("message/offline/handle claims messages archived for that user only", function ()
			local m = load();
			local stamped = chat("bob@localhost/r", "alice@localhost", "hi")
				:tag("stanza-id", { xmlns = XMLNS_SID, by = "alice@localhost", id = "x" }):up();
			assert.is_true(m.fire("message/offline/handle", { username = "alice", stanza = stamped }));
			assert.is_nil(m.fire("message/offline/handle", { username = "bob", stanza = stamped }));
			assert.is_nil(m.fire("message/offline/handle", { username = "alice", stanza = chat("bob@localhost", "alice@localhost", "x") }));
		end);

		it("message/offline/broadcast is suppressed once the session queried the archive", function ()
			local m = load();
			assert.is_nil(m.fire("message/offline/broadcast", { origin = fake.session("alice") }));
			local _, session = run_query(m, query_iq("q0", "qid0"));
			assert.is_true(m.fire("message/offline/broadcast", { origin = session }));
		end);

		it("a query marks the session mam_requested", function ()
			local m = load();
			local _, session = run_query(m, query_iq("q0", "qid0"));
			assert.is_true(session.mam_requested);
		end);
	end);

	describe("options", function ()
		it("log one error line per wrong value, naming the option and the value", function ()
			local m = load({ options = { default_archive_policy = "sometimes", max_archive_query_results = "many" } });
			local errors = {};
			for _, l in ipairs(m.logs) do
				if l.level == "error" then table.insert(errors, l.message); end
			end
			assert.equal(2, #errors, table.concat(errors, "\n"));
			assert.equal(1, m.logged("error", "default_archive_policy"));
			assert.equal(1, m.logged("error", "\"sometimes\""));
			assert.equal(1, m.logged("error", "max_archive_query_results"));
			assert.equal(1, m.logged("error", "\"many\""));
			for _, e in ipairs(errors) do
				local both = e:find("default_archive_policy", 1, true) and e:find("sometimes", 1, true)
					or e:find("max_archive_query_results", 1, true) and e:find("many", 1, true);
				assert.truthy(both, e);
			end
		end);

		it("sqlite_tune is read: the start-up line names it, and a value outside its set is an error", function ()
			local m = load({ options = { sqlite_tune = "normal" } });
			assert.equal(0, m.logged("error", ""));
			assert.equal(1, m.logged("info", "(sqlite_tune \"normal\": synchronous = NORMAL)"));
			m = load({ options = { sqlite_tune = "turbo" } });
			assert.equal(1, m.logged("error", "invalid value \"turbo\" for option 'sqlite_tune'"));
			assert.equal(0, m.logged("info", "sqlite_tune"));
		end);

		it("good values log no error", function ()
			local m = load({ options = { default_archive_policy = "roster", max_archive_query_results = 10 } });
			assert.equal(0, m.logged("error", ""));
			assert.truthy(fake.exists(m.database));
		end);

		it("the database goes where mam_rs_database points", function ()
			local dir = fake.tempdir();
			local m = load({ options = { mam_rs_database = dir .. "/elsewhere.sqlite" } });
			assert.truthy(fake.exists(dir .. "/elsewhere.sqlite"));
			assert.falsy(fake.exists(m.database));
		end);

		it("inside prosodyctl: errors are logged, but no hooks and no database", function ()
			local m = load({ process_type = "prosodyctl", options = { default_archive_policy = "sometimes" } });
			assert.equal(1, m.logged("error", "default_archive_policy"));
			assert.same({}, m.hooks);
			assert.same({}, m.watchers);
			assert.is_nil(m.module.unload);
			assert.falsy(fake.exists(m.database));
			local p = io.popen("ls -A '" .. m.data .. "'");
			local listing = p:read("*a");
			p:close();
			assert.equal("", listing);
		end);

		it("warns when mod_mam is loaded on the same host", function ()
			local m = load({ loaded = { localhost = { mam = true } } });
			assert.equal(1, m.logged("error", "mod_mam is loaded on localhost"));
		end);
	end);

	describe("archive-should-store", function ()
		it("stores a message with a body, reason body", function ()
			local m = load();
			local event = { stanza = chat("alice@localhost/res", "bob@localhost", "hello") };
			assert.is_true(m.fire("archive-should-store", event));
			assert.equal("body", event.reason);
		end);

		it("does not store a chat state alone, reason default", function ()
			local m = load();
			local event = { stanza = chat_state("alice@localhost/res", "bob@localhost") };
			assert.is_false(m.fire("archive-should-store", event));
			assert.equal("default", event.reason);
		end);

		it("a handler at a higher priority can veto", function ()
			local m = load();
			m.module:hook("archive-should-store", function () return false; end, 10);
			local event = { stanza = chat("alice@localhost/res", "bob@localhost", "hello") };
			assert.is_false(m.fire("archive-should-store", event));
			assert.is_nil(event.reason);

			local c2s = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "hello") };
			m.handler("pre-message/bare", 0)(c2s);
			assert.same({}, stanza_ids(c2s.stanza));
		end);
	end);

	describe("archive path", function ()
		it("reads a message's JIDs as util.jid does, for every string of up to six of a, @, / and é", function ()
			load();
			local jid_parts = package.loaded.mam_rs_native.jid_parts;
			local jid = require "util.jid";
			local alphabet, checked = { "a", "@", "/", "é" }, 0;
			local function check(s)
				local node, bare = jid_parts(s);
				assert.equal(jid.bare(s), bare, ("bare of %q"):format(s));
				assert.equal((jid.split(s)), node, ("node of %q"):format(s));
				checked = checked + 1;
			end
			local function all(prefix, n)
				check(prefix);
				if n == 0 then return; end
				for _, c in ipairs(alphabet) do all(prefix .. c, n - 1); end
			end
			all("", 6);
			assert.equal(5461, checked);
			assert.same({ n = 2 }, table.pack(jid_parts(nil)));
			assert.same({ n = 2 }, table.pack(jid_parts({})));
			assert.same({ n = 2, "alice", "alice@localhost" }, table.pack(jid_parts("alice@localhost/res")));
		end);

		it("stamps a clone with our stanza-id as last child, leaving the original alone", function ()
			local m = load();
			local original = chat("alice@localhost/res", "bob@localhost", "hello");
			local before = tostring(original);
			local event = { origin = fake.session("alice"), stanza = original };
			m.handler("pre-message/bare", 0)(event);

			assert.are_not.equal(original, event.stanza);
			assert.equal(before, tostring(original));
			assert.same({}, stanza_ids(original));

			local delivered = event.stanza;
			local last = delivered[#delivered];
			assert.equal(delivered.tags[#delivered.tags], last);
			assert.equal("stanza-id", last.name);
			assert.equal(XMLNS_SID, last.attr.xmlns);
			assert.equal("alice@localhost", last.attr.by);
			assert.is_string(last.attr.id);
			assert.truthy(#last.attr.id > 0);
			assert.equal(1, #stanza_ids(delivered));
			assert.equal("hello", delivered:get_child_text("body"));
			-- The element is a stanza as st.stanza makes it (built without its checks).
			assert.is_true(st.is_stanza(last));
			assert.same({}, last.tags);
			assert.equal(0, #last);
			assert.equal(tostring(st.stanza("stanza-id", { xmlns = XMLNS_SID, by = "alice@localhost", id = last.attr.id })),
				tostring(last));
		end);

		it("the same goes for pre-message/full, and ids differ", function ()
			local m = load();
			local e1 = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost/x", "one") };
			local e2 = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost/x", "two") };
			m.handler("pre-message/full", 0)(e1);
			m.handler("pre-message/full", 0)(e2);
			local id1, id2 = stanza_ids(e1.stanza)[1].attr.id, stanza_ids(e2.stanza)[1].attr.id;
			assert.are_not.equal(id1, id2);
		end);

		it("the whole pre-message event strips our stanza-id from the sender's outgoing copy", function ()
			local m = load();
			local event = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "hello") };
			m.fire("pre-message/bare", event);
			assert.same({}, stanza_ids(event.stanza));
			assert.equal("hello", event.stanza:get_child_text("body"));
		end);

		it("a local message is copied once: the sender's copy, stripped at -1, takes the recipient's stanza-id", function ()
			local m = load();
			local original = chat("alice@localhost/res", "bob@localhost", "hello");
			local before = tostring(original);
			local event = { origin = fake.session("alice"), stanza = original };
			-- What mod_carbons does at -0.5: it sends a clone, with the sender's stanza-id.
			local carbon;
			m.events.add_handler("pre-message/bare", function (e) carbon = st.clone(e.stanza); end, -0.5);
			m.fire("pre-message/bare", event);
			local sent = event.stanza;
			assert.are_not.equal(original, sent);
			assert.same({}, stanza_ids(sent));
			assert.equal(1, #sent.tags);
			assert.equal("alice@localhost", stanza_ids(carbon)[1].attr.by);

			m.handler("message/bare", 0)(event); -- the same event, for a local recipient
			assert.equal(sent, event.stanza);
			local ids = stanza_ids(event.stanza);
			assert.equal(1, #ids);
			assert.equal("bob@localhost", ids[1].attr.by);
			assert.equal(event.stanza.tags[#event.stanza.tags], event.stanza[#event.stanza]);
			assert.equal("hello", event.stanza:get_child_text("body"));
			assert.equal(before, tostring(original));
			assert.equal(1, #stanza_ids(carbon), "the carbon is not changed afterwards");
		end);

		it("at -1, our stanza-id goes wherever it is, and so do others claiming the sender, written unprepared", function ()
			local m = load();
			-- Handlers between 0 and -1 that change our copy in place: one appends after our
			-- stanza-id, one adds a stanza-id by the sender's JID in another case, and one by another JID.
			m.events.add_handler("pre-message/bare", function (e)
				e.stanza:tag("x", { xmlns = "urn:example:after" }):up();
				e.stanza:tag("stanza-id", { xmlns = XMLNS_SID, by = "ALICE@LocalHost", id = "other" }):up();
				e.stanza:tag("stanza-id", { xmlns = XMLNS_SID, by = "example.com", id = "theirs" }):up();
			end, -0.5);
			local event = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "hello") };
			m.fire("pre-message/bare", event);
			local ids = stanza_ids(event.stanza);
			assert.equal(1, #ids);
			assert.equal("example.com", ids[1].attr.by);
			local names = {};
			for _, child in ipairs(event.stanza.tags) do names[#names + 1] = child.name; end
			assert.same({ "body", "x", "stanza-id" }, names);
			local children = {};
			for _, child in ipairs(event.stanza) do children[#children + 1] = child.name; end
			assert.same(names, children);
		end);

		it("at -1, a stanza another handler put in the event is copied, not changed", function ()
			local m = load();
			local foreign;
			m.events.add_handler("pre-message/bare", function (e)
				foreign = st.clone(e.stanza);
				e.stanza = foreign;
			end, -0.5);
			local event = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "hello") };
			m.fire("pre-message/bare", event);
			assert.same({}, stanza_ids(event.stanza));
			assert.are_not.equal(foreign, event.stanza);
			assert.equal(1, #stanza_ids(foreign));
		end);

		it("a chat state alone gets no stanza-id", function ()
			local m = load();
			local original = chat_state("alice@localhost/res", "bob@localhost");
			local event = { origin = fake.session("alice"), stanza = original };
			m.handler("pre-message/bare", 0)(event);
			assert.same({}, stanza_ids(event.stanza));
		end);

		it("incoming: a spoofed stanza-id by the recipient is removed, one by another JID kept", function ()
			local m = load({ options = { default_archive_policy = false } });
			local incoming = chat("mallory@example.com/x", "alice@localhost", "hello")
				:tag("stanza-id", { xmlns = XMLNS_SID, by = "alice@localhost", id = "spoofed" }):up()
				:tag("stanza-id", { xmlns = XMLNS_SID, by = "example.com", id = "theirs" }):up();
			local before = tostring(incoming);
			local event = { origin = fake.session("mallory", "example.com"), stanza = incoming };
			m.handler("message/bare", 0)(event);
			local ids = stanza_ids(event.stanza);
			assert.equal(1, #ids);
			assert.equal("example.com", ids[1].attr.by);
			assert.equal("theirs", ids[1].attr.id);
			assert.equal(before, tostring(incoming));
		end);

		it("incoming and archived: only our own stanza-id by the recipient remains", function ()
			local m = load();
			local incoming = chat("bob@localhost/x", "alice@localhost", "hello")
				:tag("stanza-id", { xmlns = XMLNS_SID, by = "alice@localhost", id = "spoofed" }):up()
				:tag("stanza-id", { xmlns = XMLNS_SID, by = "bob@localhost", id = "theirs" }):up();
			local event = { origin = {}, stanza = incoming };
			m.handler("message/bare", 0)(event);
			local ours, theirs = {}, {};
			for _, tag in ipairs(stanza_ids(event.stanza)) do
				table.insert(tag.attr.by == "alice@localhost" and ours or theirs, tag);
			end
			assert.equal(1, #ours);
			assert.are_not.equal("spoofed", ours[1].attr.id);
			assert.equal(1, #theirs);
			assert.equal("theirs", theirs[1].attr.id);
		end);

		it("incoming to a user that does not exist is not archived", function ()
			local m = load();
			local event = { origin = {}, stanza = chat("bob@localhost/x", "nobody@localhost", "hello") };
			m.handler("message/bare", 0)(event);
			assert.same({}, stanza_ids(event.stanza));
		end);

		it("with default_archive_policy = false nothing is stamped", function ()
			local m = load({ options = { default_archive_policy = false } });
			local event = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "hello") };
			m.handler("pre-message/bare", 0)(event);
			assert.same({}, stanza_ids(event.stanza));
			local incoming = { origin = {}, stanza = chat("bob@localhost/x", "alice@localhost", "hello") };
			m.handler("message/bare", 0)(incoming);
			assert.same({}, stanza_ids(incoming.stanza));
		end);

		it("with \"roster\" only contacts in the roster are stamped", function ()
			local m = load({
				options = { default_archive_policy = "roster" },
				rosters = { alice = { ["bob@localhost"] = { subscription = "both", groups = {} } } },
			});
			local handler = m.handler("pre-message/bare", 0);
			local to_bob = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "hi bob") };
			local to_carol = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "carol@localhost", "hi carol") };
			handler(to_bob);
			handler(to_carol);
			assert.equal(1, #stanza_ids(to_bob.stanza));
			assert.same({}, stanza_ids(to_carol.stanza));
		end);

		it("fires archive-message-added with the stored id", function ()
			local m = load();
			local added;
			m.module:hook("archive-message-added", function (e) added = e; end);
			local message = chat("alice@localhost/res", "bob@localhost", "hello"):tag("active", { xmlns = XMLNS_CHATSTATES }):up();
			local event = { origin = fake.session("alice"), stanza = message };
			m.handler("pre-message/bare", 0)(event);
			-- Fired once the row is committed, as stock fires it after its append.
			assert.is_nil(added, "fired before its row was committed");
			assert.is_true(m.wait_for(function () return added ~= nil; end));
			assert.equal("alice", added.for_user);
			assert.equal(stanza_ids(event.stanza)[1].attr.id, added.id);
			-- The stored copy, as stock passes it: chat state stripped, no stanza-id, a real stanza.
			assert.is_true(st.is_stanza(added.stanza));
			assert.equal("hello", added.stanza:get_child_text("body"));
			assert.is_nil(added.stanza:get_child("active", XMLNS_CHATSTATES));
			assert.same({}, stanza_ids(added.stanza));
			assert.is_not_nil(event.stanza:get_child("active", XMLNS_CHATSTATES), "the live copy keeps it");
		end);

		-- The stored copy is written as XML straight from the table (src/lua/stanza.rs, to_xml)
		-- and archive-message-added's stanza is that text parsed again: a round trip.
		local function stored_copy(m, message)
			local added;
			m.module:hook("archive-message-added", function (e) added = e; end);
			local event = { origin = fake.session("alice"), stanza = message };
			m.handler("pre-message/bare", 0)(event);
			if #stanza_ids(event.stanza) == 0 then return nil; end -- Not archived.
			assert(m.wait_for(function () return added ~= nil; end), "archived, but no archive-message-added");
			return added.stanza;
		end

		it("stores the message exactly: namespaces, prefixed and xml: attributes, escapes, line ends", function ()
			local m = load();
			local message = st.message({ from = "alice@localhost/res", to = "bob@localhost", type = "chat",
				id = "q'\"<&>", ["xml:lang"] = "en" })
				:text_tag("body", "a\r\nb\tc <&> ' \" ]]> \u{e9}\u{1F600}")
				:tag("x", { xmlns = "urn:example:x", ["urn:example:attr\1key"] = "v\n1\t2\r", plain = "p" })
					:tag("y"):text("deep"):up()
					:tag("z", { xmlns = "urn:example:z", ["xml:lang"] = "de" }):up()
					:text(" ")
				:up();
			local copy = stored_copy(m, message);
			assert.is_table(copy, "not archived");
			-- The XML content only (util.stanza's builder keeps its position in last_add).
			local function content(el)
				if type(el) ~= "table" then return el; end
				local c = { name = el.name, attr = el.attr };
				for i, child in ipairs(el) do c[i] = content(child); end
				return c;
			end
			assert.same(content(message), content(copy));
		end);

		it("a message XML cannot carry is delivered but not stored, naming the reason", function ()
			for _, case in ipairs({
				-- util.stanza refuses control characters; a module's raw table does not.
				{ (function () local c = chat("alice@localhost/res", "bob@localhost", "x"); c.tags[1][1] = "bell \7"; return c; end)(), "U+0007" },
				{ (function () local c = chat("alice@localhost/res", "bob@localhost", "x"):tag("y"):up(); c.tags[2].name = "bad name"; return c; end)(), "\"bad name\"" },
				{ (function () local c = chat("alice@localhost/res", "bob@localhost", "x"); c.tags[1].attr["a:b"] = "1"; return c; end)(), "\"a:b\"" },
			}) do
				local m = load();
				local session = fake.session("alice");
				local event = { origin = session, stanza = case[1] };
				m.handler("pre-message/bare", 0)(event);
				assert.same({}, stanza_ids(event.stanza));
				local logged = {};
				for _, l in ipairs(session.logs) do
					if l.level == "error" and l.message:find("Not archiving stanza", 1, true)
						and l.message:find(case[2], 1, true) then
						table.insert(logged, l.message);
					end
				end
				assert.equal(1, #logged, case[2]);
			end
		end);

		it("dont_archive_namespaces strips those children from the stored copy, and a message left empty is not stored", function ()
			local m = load({ options = { dont_archive_namespaces = { "urn:example:x", "urn:xmpp:hints" } } });
			local message = chat("alice@localhost/res", "bob@localhost", "hi")
				:tag("x", { xmlns = "urn:example:x" }):up()
				:tag("y", { xmlns = "urn:example:y" }):tag("x", { xmlns = "urn:example:x" }):up():up();
			local copy = stored_copy(m, message);
			assert.is_table(copy, "not archived");
			assert.equal(2, #copy.tags);
			assert.same({ "body", "y" }, { copy.tags[1].name, copy.tags[2].name });
			assert.is_not_nil(copy.tags[2]:get_child("x", "urn:example:x"), "only top-level children are stripped");
			-- A store hint makes stock archive it; stripped of the hint and x, nothing is left.
			local emptied = chat("alice@localhost/res", "bob@localhost")
				:tag("store", { xmlns = "urn:xmpp:hints" }):up()
				:tag("x", { xmlns = "urn:example:x" }):up();
			assert.is_nil(stored_copy(m, emptied));
		end);

	end);

	describe("held deliveries", function ()
		local async = require "util.async";
		local filters = require "util.filters";

		-- A client session whose send goes through Prosody's stanzas/out filters, as
		-- sessionmanager's does; what reaches the connection is in session.sent.
		local function client(user, resource, host)
			local session = fake.session(user, host, resource);
			session.type = "c2s_unauthed"; -- As mod_c2s makes it: the filter hooks run now.
			local filter = filters.initialize(session);
			session.type = "c2s";
			function session.send(stanza)
				stanza = filter("stanzas/out", stanza);
				if stanza then table.insert(session.sent, stanza); end
				return true;
			end
			return session;
		end

		-- alice sends bob a message in one runner, as Prosody routes it: the sender's copy
		-- (pre-message/bare), then the recipient's (message/bare), delivered to bob's session.
		-- Returns whether the runner got to the end without waiting.
		local function send(m, alice, bob, body)
			local out = { origin = alice, stanza = chat("alice@localhost/res", "bob@localhost", body or "hello") };
			local finished = false;
			async.runner(function ()
				m.handler("pre-message/bare", 0)(out);
				m.handler("pre-message/bare", -1)(out);
				local inbound = { origin = alice, stanza = out.stanza };
				m.handler("message/bare", 0)(inbound);
				bob.send(inbound.stanza);
				finished = true;
			end):run(true);
			return finished;
		end

		it("the sender goes on at once; the recipient gets the message once its row is committed", function ()
			local m = load();
			local alice, bob = client("alice"), client("bob");
			assert.is_true(send(m, alice, bob), "the sender's handler waited");
			assert.same({}, bob.sent, "delivered before the commit");
			assert.is_true(m.wait_for(function () return #bob.sent == 1; end));
			local ids = stanza_ids(bob.sent[1]);
			assert.equal(1, #ids);
			assert.equal("bob@localhost", ids[1].attr.by);
			-- Committed: the id is in bob's archive.
			local iq = st.iq({ type = "set", id = "q1", from = "bob@localhost/res", to = "bob@localhost" })
				:tag("query", { xmlns = XMLNS_MAM }):up();
			assert.is_true(m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = bob, stanza = iq }));
			assert.is_true(m.wait_for(function () return bob.sent[#bob.sent].name == "iq"; end));
			assert.equal(3, #bob.sent);
			assert.equal(ids[1].attr.id, bob.sent[2]:get_child("result", XMLNS_MAM).attr.id);
		end);

		it("what is sent to the session after a held message waits behind it, in order", function ()
			local m = load();
			local alice, bob = client("alice"), client("bob");
			send(m, alice, bob, "one");
			bob.send(st.presence({ from = "alice@localhost/res" }));
			send(m, alice, bob, "two");
			bob.send(st.iq({ type = "result", id = "ping" }));
			assert.same({}, bob.sent);
			assert.is_true(m.wait_for(function () return #bob.sent == 4; end));
			assert.same({ "message", "presence", "message", "iq" },
				{ bob.sent[1].name, bob.sent[2].name, bob.sent[3].name, bob.sent[4].name });
			assert.equal("one", bob.sent[1]:get_child_text("body"));
			assert.equal("two", bob.sent[3]:get_child_text("body"));
		end);

		it("nothing is held while every row is committed; other hosts' sessions are not held", function ()
			local m = load();
			local alice, bob = client("alice"), client("bob");
			bob.send(chat("carol@example.com/x", "bob@localhost/res", "not archived here"));
			assert.equal(1, #bob.sent);
			send(m, alice, client("bob", "phone"));
			local elsewhere = client("dave", "res", "example.org");
			elsewhere.send(chat("x@example.org", "dave@example.org", "hi"));
			assert.equal(1, #elsewhere.sent, "another host's session was held");
			bob.send(chat("carol@example.com/x", "bob@localhost/res", "while a row waits"));
			assert.equal(1, #bob.sent, "held while a row waits");
			assert.is_true(m.wait_for(function () return #bob.sent == 2; end));
		end);

		it("sessions that opened before the module loaded are held too, BOSH ones included", function ()
			local bob, phone = client("bob"), client("bob", "phone");
			local m = load({ c2s_sessions = { conn = bob }, bosh_sessions = { sid = phone } });
			local alice = client("alice");
			send(m, alice, bob);
			phone.send(chat("alice@localhost/res", "bob@localhost", "to the phone"));
			assert.same({}, bob.sent);
			assert.same({}, phone.sent);
			assert.is_true(m.wait_for(function () return #bob.sent == 1 and #phone.sent == 1; end));
		end);

		it("archive results go out at once, even while rows wait", function ()
			local m = load();
			local alice, bob = client("alice"), client("bob");
			archive_from_alice(m, { "earlier" });
			assert.is_true(m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = alice, stanza = query_iq("q2", "f2") }));
			os.execute("sleep 0.3"); -- The answer is ready; the loop has not drained it.
			send(m, alice, bob); -- A row handed out now is not committed by the drain just after.
			m.watcher.onreadable(m.watcher);
			assert.equal(2, #alice.sent, "the answer was held");
			assert.is_not_nil(alice.sent[1]:get_child("result", XMLNS_MAM));
			assert.equal("iq", alice.sent[2].name);
		end);

		it("a session whose send fails does not hold up the others' deliveries", function ()
			local m = load();
			local alice, bob, carol = client("alice"), client("bob"), client("carol");
			filters.add_filter(bob, "stanzas/out", function () error("a broken filter"); end, -10);
			send(m, alice, bob);
			carol.send(chat("alice@localhost/res", "carol@localhost", "also held"));
			assert.is_true(m.wait_for(function () return #carol.sent == 1; end), "carol's delivery was lost");
			assert.equal(1, m.logged("error", "Could not send a held stanza to bob@localhost/res"));
		end);

		it("a closing session gets what is held before its stream ends", function ()
			local m = load();
			local alice, bob = client("alice"), client("bob");
			send(m, alice, bob);
			assert.same({}, bob.sent);
			m.fire("pre-session-close", { session = bob });
			assert.equal(1, #bob.sent);
		end);

		it("a session going away hands what is held to the next handlers (mod_smacks)", function ()
			local m = load();
			local alice, bob = client("alice"), client("bob");
			send(m, alice, bob);
			local seen;
			m.events.add_handler("pre-resource-unbind", function () seen = #bob.sent; end, 0);
			m.fire("pre-resource-unbind", { session = bob });
			assert.equal(1, seen);
		end);

		it("the sender waits for its commit only when the writer falls behind", function ()
			local m = load({ options = { mam_rs_max_queued_rows = 2 } }); -- Waits from one row queued.
			local alice, bob = client("alice"), client("bob");
			assert.is_false(send(m, alice, bob), "did not wait with the queue at its mark");
			assert.is_true(m.wait_for(function () return #bob.sent == 1; end));
		end);

		it("unloading sends what is held, and the filter goes", function ()
			local bob = client("bob");
			local m = load({ c2s_sessions = { conn = bob } });
			send(m, client("alice"), bob);
			assert.same({}, bob.sent);
			m.unload();
			assert.equal(1, #bob.sent);
			assert.is_nil(bob.filters["stanzas/out"][1], "the filter is still there");
		end);
	end);

	describe("query path", function ()
		it("sends each result as a util.stanza, then the iq result with <fin complete>", function ()
			local m = load();
			local ids = archive_from_alice(m, { "one", "two", "three" });
			local sent = run_query(m, query_iq("q1", "qid1"));

			assert.equal(4, #sent);
			for i = 1, 3 do
				local msg = sent[i];
				assert.is_true(st.is_stanza(msg));
				assert.equal("message", msg.name);
				assert.equal("alice@localhost/res", msg.attr.to);
				local result = assert(msg:get_child("result", XMLNS_MAM));
				assert.equal("qid1", result.attr.queryid);
				assert.equal(ids[i], result.attr.id);
				local forwarded = assert(result:get_child("forwarded", "urn:xmpp:forward:0"));
				local inner = assert(forwarded:get_child("message", "jabber:client") or forwarded:get_child("message"));
				assert.equal(({ "one", "two", "three" })[i], inner:get_child_text("body"));
			end
			local iq = sent[4];
			assert.is_true(st.is_stanza(iq));
			assert.equal("iq", iq.name);
			assert.equal("result", iq.attr.type);
			assert.equal("q1", iq.attr.id);
			assert.equal("alice@localhost/res", iq.attr.to);
			local fin = assert(iq:get_child("fin", XMLNS_MAM));
			assert.equal("true", fin.attr.complete);
		end);

		it("a bad query gets an iq error with bad-request", function ()
			local m = load();
			archive_from_alice(m, { "one" });
			local iq = st.iq({ type = "set", id = "bad1", from = "alice@localhost/res", to = "alice@localhost" })
				:tag("query", { xmlns = XMLNS_MAM, queryid = "qbad" })
					:tag("x", { xmlns = "jabber:x:data", type = "submit" })
						:tag("field", { var = "FORM_TYPE", type = "hidden" })
							:text_tag("value", "urn:xmpp:mam:1")
						:up()
					:up()
				:up();
			local sent = run_query(m, iq);
			assert.equal(1, #sent);
			local reply = sent[1];
			assert.is_true(st.is_stanza(reply));
			assert.equal("error", reply.attr.type);
			assert.equal("bad1", reply.attr.id);
			local err = assert(reply:get_child("error"));
			assert.truthy(err:get_child("bad-request", XMLNS_STANZAS));
		end);

		it("the iq-get handler replies with the form", function ()
			local m = load();
			local session = fake.session("alice");
			local iq = st.iq({ type = "get", id = "f1", from = "alice@localhost/res", to = "alice@localhost" })
				:tag("query", { xmlns = XMLNS_MAM }):up();
			assert.is_true(m.fire("iq-get/self/" .. XMLNS_MAM .. ":query", { origin = session, stanza = iq }));
			assert.equal(1, #session.sent);
			local reply = session.sent[1];
			assert.is_true(st.is_stanza(reply));
			assert.equal("result", reply.attr.type);
			assert.equal("f1", reply.attr.id);
			local query = assert(reply:get_child("query", XMLNS_MAM));
			local form = assert(query:get_child("x", "jabber:x:data"));
			assert.equal("form", form.attr.type);
			local form_type;
			for field in form:childtags("field") do
				if field.attr.var == "FORM_TYPE" then form_type = field:get_child_text("value"); end
			end
			assert.equal(XMLNS_MAM, form_type);
		end);
	end);

	describe("preferences", function ()
		it("a get on a fresh account gives the configured default and both empty lists", function ()
			local m = load({ options = { default_archive_policy = "roster" } });
			local reply = prefs_iq(m);
			assert.equal("result", reply.attr.type);
			local prefs = reply:get_child("prefs", XMLNS_MAM);
			assert.equal("roster", prefs.attr.default);
			assert.is_not_nil(prefs:get_child("always"));
			assert.is_not_nil(prefs:get_child("never"));
			assert.same({}, m.stores.archive_prefs, "a plain get stores nothing");
		end);

		it("a set is stored in stock's form, replaces everything, and is echoed", function ()
			local m = load();
			prefs_iq(m, prefs_el("never", { "Romeo@Montague.LIT" }, { "tybalt@capulet.lit" }));
			assert.same({ [false] = false, ["romeo@montague.lit"] = true, ["tybalt@capulet.lit"] = false },
				m.stores.archive_prefs.alice);
			local reply = prefs_iq(m, prefs_el("always", {}, { "x@y" }));
			assert.same({ [false] = true, ["x@y"] = false }, m.stores.archive_prefs.alice);
			assert.equal("always", reply:get_child("prefs", XMLNS_MAM).attr.default);
			assert.same({}, jids(reply, "always"));
			assert.same({ "x@y" }, jids(reply, "never"));
		end);

		it("prefs stored by stock mod_mam are used as they are", function ()
			local data = fake.tempdir();
			local m = load({ data = data });
			m.stores.archive_prefs.alice = { [false] = "roster", ["bob@localhost"] = false };
			local reply = prefs_iq(m);
			assert.equal("roster", reply:get_child("prefs", XMLNS_MAM).attr.default);
			assert.same({ "bob@localhost" }, jids(reply, "never"));
			local event = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "no") };
			m.handler("pre-message/bare", 0)(event);
			assert.same({}, stanza_ids(event.stanza), "never-JID archived");
		end);

		it("decide archiving: always-JID despite default never, nothing without a default", function ()
			local m = load();
			prefs_iq(m, prefs_el("never", { "bob@localhost" }));
			local to_bob = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "a") };
			local to_carol = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "carol@localhost", "b") };
			m.handler("pre-message/bare", 0)(to_bob);
			m.handler("pre-message/bare", 0)(to_carol);
			assert.equal(1, #stanza_ids(to_bob.stanza));
			assert.equal(0, #stanza_ids(to_carol.stanza));
			prefs_iq(m, prefs_el(nil, {}));
			local again = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "c") };
			m.handler("pre-message/bare", 0)(again);
			assert.equal(0, #stanza_ids(again.stanza), "no default means archive nothing");
		end);

		it("a store failure is an internal-server-error naming the cause", function ()
			local m = load({ store_fails = true });
			local reply = prefs_iq(m, prefs_el("always"));
			assert.equal("error", reply.attr.type);
			local err = reply:get_child("error");
			assert.equal("cancel", err.attr.type);
			assert.is_not_nil(err:get_child("internal-server-error", XMLNS_STANZAS));
			assert.truthy(err:get_child_text("text", XMLNS_STANZAS):find("disk full", 1, true));
		end);

		it("the cache follows writes made by others once the user's session goes", function ()
			local m = load();
			prefs_iq(m, prefs_el("always"));
			-- mod_mam_adhoc writes the store directly (through mod_mam/mamprefs).
			m.stores.archive_prefs.alice = { [false] = false };
			m.fire("pre-resource-unbind", { session = fake.session("alice") });
			local event = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "x") };
			m.handler("pre-message/bare", 0)(event);
			assert.equal(0, #stanza_ids(event.stanza));
		end);
	end);

	describe("account deletion", function ()
		it("removes the user's archive and prefs, and no one else's", function ()
			local m = load();
			prefs_iq(m, prefs_el("always"));
			m.stores.archive_prefs.bob = { [false] = true };
			archive_from_alice(m, { "one", "two" });
			m.global_events.fire_event("user-deleted", { username = "alice", host = "localhost" });
			m.global_events.fire_event("user-deleted", { username = "bob", host = "elsewhere" });
			assert.is_nil(m.stores.archive_prefs.alice);
			assert.same({ [false] = true }, m.stores.archive_prefs.bob, "another host's event is not ours");
			assert.is_true(m.wait_for(function ()
				return m.logged("info", "Removed the archive of deleted account alice@localhost (2 messages)") == 1;
			end));
			local sent = run_query(m, st.iq({ type = "set", id = "q", from = "alice@localhost/res" }):tag("query", { xmlns = XMLNS_MAM }));
			assert.equal(1, #sent, "only the iq result: the archive is empty");
		end);
	end);

	describe("limits", function ()
		it("a deeply nested stanza is refused cleanly, never crashes the server", function ()
			local m = load();
			local function nest(el, levels)
				for _ = 1, levels do el:tag("a", { xmlns = "urn:example:deep" }); end
				return el:reset();
			end
			-- A message: delivered as it is, not archived.
			local message = nest(chat("alice@localhost/res", "bob@localhost", "deep"), 20000);
			local event = { origin = fake.session("alice"), stanza = message };
			m.handler("pre-message/bare", 0)(event);
			assert.same({}, stanza_ids(event.stanza));
			-- A query: bad-request.
			local session = fake.session("alice");
			local iq = st.iq({ type = "set", id = "deep", from = "alice@localhost/res" }):tag("query", { xmlns = XMLNS_MAM });
			nest(iq, 20000);
			m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = session, stanza = iq });
			assert.is_not_nil(session.sent[1]:get_child("error"):get_child("bad-request", XMLNS_STANZAS));
			-- Prefs: bad-request.
			local prefs = nest(st.stanza("prefs", { xmlns = XMLNS_MAM, default = "always" }), 20000);
			local reply = prefs_iq(m, prefs);
			assert.is_not_nil(reply:get_child("error"):get_child("bad-request", XMLNS_STANZAS));
			-- And the module still works.
			archive_from_alice(m, { "fine" });
		end);

		it("prefs with more JIDs than mam_rs_max_prefs_jids are refused, naming the limit", function ()
			local m = load({ options = { mam_rs_max_prefs_jids = 2 } });
			local reply = prefs_iq(m, prefs_el("always", { "a@x", "b@x" }, { "c@x" }));
			assert.equal("error", reply.attr.type);
			local err = reply:get_child("error");
			assert.equal("modify", err.attr.type);
			assert.is_not_nil(err:get_child("not-acceptable", XMLNS_STANZAS));
			assert.truthy(err:get_child_text("text", XMLNS_STANZAS):find("mam_rs_max_prefs_jids", 1, true));
			assert.is_nil(m.stores.archive_prefs.alice, "nothing stored");
			assert.equal("result", prefs_iq(m, prefs_el("always", { "a@x" }, { "c@x" })).attr.type);
		end);

		it("queries beyond mam_rs_max_queries_per_second get wait/resource-constraint", function ()
			local m = load({ options = { mam_rs_max_queries_per_second = 2 } });
			local session = fake.session("alice");
			for i = 1, 5 do
				m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = session, stanza = query_iq("q" .. i) });
			end
			local refused = 0;
			for _, sent in ipairs(session.sent) do
				local err = sent:get_child("error");
				if err and err:get_child("resource-constraint", XMLNS_STANZAS) then
					assert.equal("wait", err.attr.type);
					refused = refused + 1;
				end
			end
			assert.equal(3, refused, "a burst of two, the rest refused");
			assert.is_true(m.wait_for(function () return #session.sent == 5; end), "the two allowed are answered");
			os.execute("sleep 1.1");
			local later = fake.session("alice");
			m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = later, stanza = query_iq("q9") });
			assert.is_true(m.wait_for(function () return #later.sent > 0; end));
			assert.equal("result", later.sent[#later.sent].attr.type);
		end);
	end);

	describe("mam_smart_enable", function ()
		it("archives nothing until the client uses MAM, then persists the default", function ()
			local m = load({ options = { mam_smart_enable = true } });
			local before = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "1") };
			m.handler("pre-message/bare", 0)(before);
			assert.equal(0, #stanza_ids(before.stanza));
			assert.is_nil(m.stores.archive_prefs.alice);
			run_query(m, query_iq("q1"));
			assert.same({ [false] = true }, m.stores.archive_prefs.alice);
			local after = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "2") };
			m.handler("pre-message/bare", 0)(after);
			assert.equal(1, #stanza_ids(after.stanza));
		end);

		it("an explicit never stays never", function ()
			local m = load({ options = { mam_smart_enable = true } });
			prefs_iq(m, prefs_el("never"));
			run_query(m, query_iq("q1"));
			assert.same({ [false] = false }, m.stores.archive_prefs.alice);
		end);
	end);

	describe("sending a large page", function ()
		it("goes out a few results per loop turn, in order, the iq reply last", function ()
			local m = load();
			local bodies = {};
			for i = 1, 25 do bodies[i] = ("m%02d"):format(i); end
			local ids = archive_from_alice(m, bodies);
			local session = fake.session("alice");
			local iq = st.iq({ type = "set", id = "q1", from = "alice@localhost/res" })
				:tag("query", { xmlns = XMLNS_MAM, queryid = "big" })
					:tag("set", { xmlns = "http://jabber.org/protocol/rsm" }):text_tag("max", "25"):up()
				:up();
			m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = session, stanza = iq });
			for _ = 1, 100 do -- The eventfd only, no timers: one loop turn.
				if #session.sent > 0 then break; end
				os.execute("sleep 0.05");
				m.watcher.onreadable(m.watcher);
			end
			assert.equal(10, #session.sent, "only the first chunk before the loop turns");
			-- Each further turn sends one more chunk: the shim poked its own eventfd, so the
			-- loop comes back at once, with no timer (a zero timer waits a millisecond).
			assert.is_true(fd_readable(m), "the eventfd is poked for the next chunk");
			m.watcher.onreadable(m.watcher);
			assert.equal(20, #session.sent);
			m.watcher.onreadable(m.watcher);
			assert.equal(26, #session.sent);
			assert.equal(0, m.run_due_timers(), "no timer is involved");
			for i = 1, 25 do
				assert.equal(ids[i], session.sent[i]:get_child("result", XMLNS_MAM).attr.id);
			end
			assert.equal("iq", session.sent[26].name);
		end);

		it("is finished, not dropped, when the module unloads midway", function ()
			local m = load();
			local bodies = {};
			for i = 1, 25 do bodies[i] = ("m%02d"):format(i); end
			archive_from_alice(m, bodies);
			local session = fake.session("alice");
			local iq = st.iq({ type = "set", id = "q1", from = "alice@localhost/res" })
				:tag("query", { xmlns = XMLNS_MAM, queryid = "big" })
					:tag("set", { xmlns = "http://jabber.org/protocol/rsm" }):text_tag("max", "25"):up()
				:up();
			m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = session, stanza = iq });
			assert.is_true(m.wait_for(function () return #session.sent > 0; end));
			m.unload();
			assert.equal(26, #session.sent);
		end);
	end);

	describe("metadata", function ()
		it("is empty for an empty archive, else names the first and last message", function ()
			local m = load();
			local function metadata()
				local session = fake.session("alice");
				local iq = st.iq({ type = "get", id = "m1", from = "alice@localhost/res" }):tag("metadata", { xmlns = XMLNS_MAM }):up();
				assert.is_true(m.fire("iq-get/self/" .. XMLNS_MAM .. ":metadata", { origin = session, stanza = iq }));
				assert.is_true(m.wait_for(function () return #session.sent > 0; end));
				return session.sent[1]:get_child("metadata", XMLNS_MAM);
			end
			assert.same({}, metadata().tags);
			local ids = archive_from_alice(m, { "a", "b", "c" });
			local md = metadata();
			assert.equal(ids[1], md:get_child("start").attr.id);
			assert.equal(ids[3], md:get_child("end").attr.id);
			assert.truthy(md:get_child("end").attr.timestamp:match("^%d%d%d%d%-%d%d%-%d%dT"));
		end);
	end);

	describe("events", function ()
		it("archive-query carries the origin, the start time and the newest id returned", function ()
			local m = load();
			local ids = archive_from_alice(m, { "a", "b" });
			local seen;
			m.module:hook("archive-query", function (e) seen = e; end);
			local _, session = run_query(m, query_iq("q1"));
			assert.is_not_nil(seen);
			assert.equal(session, seen.origin);
			assert.equal(ids[2], seen.end_id);
			assert.is_number(seen.start_time);
		end);
	end);

	describe("storage_archive_item_limit", function ()
		it("0 archives nothing", function ()
			local m = load({ options = { storage_archive_item_limit = 0 } });
			local event = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "x") };
			m.handler("pre-message/bare", 0)(event);
			assert.equal(0, #stanza_ids(event.stanza));
		end);

		it("keeps the archive at the limit, dropping the oldest", function ()
			local m = load({ options = { storage_archive_item_limit = 3 } });
			local ids = archive_from_alice(m, { "1", "2", "3", "4" });
			local sent = run_query(m, query_iq("q1"));
			local got = {};
			for i = 1, #sent - 1 do table.insert(got, sent[i]:get_child("result", XMLNS_MAM).attr.id); end
			-- 3 rows at the limit: down to floor(3 * 0.99) = 2, then the new one makes 3 again.
			assert.same({ ids[2], ids[3], ids[4] }, got);
		end);
	end);

	describe("expiry", function ()
		local function expiry_timer(m)
			for _, t in ipairs(m.timers) do
				if t.fn ~= nil and t.delay ~= 0 then return t; end
			end
		end

		it("runs on archive_cleanup_interval and removes what is older than archive_expires_after", function ()
			local m = load({ options = { archive_expires_after = 1, archive_cleanup_interval = 5 } });
			local timer = assert(expiry_timer(m), "no expiry timer");
			assert.equal(5, timer.delay);
			archive_from_alice(m, { "old 1", "old 2" });
			os.execute("sleep 1.2");
			local kept = archive_from_alice(m, { "new" });
			assert.equal(5, timer.fn(), "the timer repeats every interval");
			assert.is_true(m.wait_for(function () return m.logged("info", "Deleted 2 expired messages") == 1; end));
			local sent = run_query(m, query_iq("q1"));
			assert.equal(2, #sent);
			assert.equal(kept[1], sent[1]:get_child("result", XMLNS_MAM).attr.id);
			-- Reported to metrics: one run done, two messages removed, the run timed.
			assert.equal(1, m.metrics.cleanup_runs["expired|done"]);
			assert.equal(2, m.metrics.cleanup_removed["expired"]);
			assert.equal(1, m.measures.cleanup);
		end);

		it("defaults to one week, checked every 4 hours at most a minute after start", function ()
			local m = load();
			assert.equal(60, assert(expiry_timer(m)).delay);
			assert.equal(0, m.logged("error", "archive_expires_after"));
		end);

		it("\"never\" and false schedule nothing", function ()
			for _, never in ipairs({ "never", false }) do
				local m = load({ options = { archive_expires_after = never } });
				assert.is_nil(expiry_timer(m));
				m.unload();
			end
		end);

		it("an unreadable value is one error naming the option, and disables expiry", function ()
			local m = load({ options = { archive_expires_after = "forever" } });
			assert.equal(1, m.logged("error", "'archive_expires_after'"));
			assert.equal(1, m.logged("error", "\"forever\""));
			assert.is_nil(expiry_timer(m));
			archive_from_alice(m, { "still archived" });
		end);

		it("an ambiguous \"2m\" is read as months, with a warning naming the full syntax", function ()
			local m = load({ options = { archive_expires_after = "2m" } });
			assert.equal(1, m.logged("warn", "full syntax"));
			assert.is_not_nil(expiry_timer(m));
		end);
	end);

	describe("metrics", function ()
		local function collect(m) m.global_events.fire_event("stats-update"); end

		local function sum(samples)
			local total = 0;
			for _, v in ipairs(samples or {}) do total = total + v; end
			return total;
		end

		it("count messages archived by direction, and those not archived by reason", function ()
			local m = load({ statistics = true });
			archive_from_alice(m, { "one", "two", "three" });
			local incoming = m.handler("message/bare", 0);
			incoming({ origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "to bob") });
			incoming({ origin = fake.session("alice"), stanza = chat("alice@localhost/res", "nobody@localhost", "to no one") });
			m.handler("pre-message/bare", 0)({ origin = fake.session("alice"), stanza = chat_state("alice@localhost/res", "bob@localhost") });
			collect(m);
			assert.equal(3, m.metrics.archived["out"]);
			assert.equal(1, m.metrics.archived["in"]);
			assert.equal(1, m.metrics.not_archived["policy"]);
			assert.equal(1, m.metrics.not_archived["prefs"]);
			assert.equal(0, m.metrics.not_archived["queue-full"], "every reason is there from the start");
			assert.equal(0, m.metrics.failed_writes[""]);
		end);

		it("time queries and commits, and read the archive figures in the background", function ()
			local m = load({ statistics = true });
			archive_from_alice(m, { "one", "two" });
			run_query(m, query_iq("q1"));
			collect(m);
			assert.equal(1, m.metrics.queries["ok"]);
			assert.equal(0, m.metrics.queries["error"]);
			assert.equal(1, #m.metrics.query[""]);
			assert.is_true(m.metrics.query[""][1] > 0);
			-- The query saw both rows committed: two messages in however many transactions.
			assert.equal(2, sum(m.metrics.batch_size[""]));
			assert.equal(#m.metrics.batch_size[""], #m.metrics.commit[""]);
			assert.equal(0, m.metrics.write_queue[""]);
			assert.is_true(m.wait_for(function ()
				collect(m);
				return (m.metrics.database[""] or 0) > 0;
			end), "no database size");
			assert.is_number(m.metrics.archive_messages[""]);
			assert.is_number(m.metrics.archive_users[""]);
		end);

		it("are brought up to date every second, and only while Prosody collects statistics", function ()
			local m = load({ statistics = true });
			local timer;
			for _, t in ipairs(m.timers) do
				if t.delay == 1 then timer = t; end
			end
			assert(timer, "no metrics timer");
			archive_from_alice(m, { "one" });
			assert.equal(1, timer.fn());
			assert.equal(1, m.metrics.archived["out"]);
			local off = load();
			for _, t in ipairs(off.timers) do
				assert.not_equal(1, t.delay);
			end
		end);
	end);

	describe("unload", function ()
		it("closes the watcher and the archive, and loses nothing queued", function ()
			local data = fake.tempdir();
			local first = load({ data = data });
			local ids = archive_from_alice(first, { "one", "two", "three" });
			first.unload();
			assert.is_true(first.watcher.closed);
			-- Prosody removes the hooks only after unload; a stanza reaching them meanwhile is
			-- passed on untouched (delivered, not stamped), never dropped by an error.
			local late = { origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "late") };
			local original = late.stanza;
			assert.has_no_error(function () first.handler("pre-message/bare", 0)(late); end);
			assert.equal(original, late.stanza);
			assert.is_nil(late.stanza:get_child("stanza-id", "urn:xmpp:sid:0"));
			local qsession = fake.session("alice");
			assert.is_nil(first.handler("iq-set/self/" .. XMLNS_MAM .. ":query", 0)({ origin = qsession, stanza = query_iq("q9", "qid9") }));
			assert.same({}, qsession.sent);

			local second = load({ data = data });
			local sent = run_query(second, query_iq("q2", "qid2"));
			assert.equal(4, #sent);
			for i = 1, 3 do
				assert.equal(ids[i], sent[i]:get_child("result", XMLNS_MAM).attr.id);
			end
			assert.equal("true", sent[4]:get_child("fin", XMLNS_MAM).attr.complete);
		end);

		it("answers a query still in flight", function ()
			local m = load({ options = { mam_rs_test_query_delay = 0.3 } });
			archive_from_alice(m, { "one" });
			local session = fake.session("alice");
			m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = session, stanza = query_iq("q3", "qid3") });
			assert.same({}, session.sent);
			m.unload();
			assert.equal(2, #session.sent);
			assert.equal("iq", session.sent[2].name);
			assert.equal("result", session.sent[2].attr.type);
		end);

		it("answers its query in flight while another host keeps the shared engine running", function ()
			local delay = { mam_rs_test_query_delay = 0.3 };
			local m = load({ options = delay });
			local other = load({ host = "second.localhost", data = m.data, options = delay });
			archive_from_alice(m, { "one" });
			local session = fake.session("alice");
			m.fire("iq-set/self/" .. XMLNS_MAM .. ":query", { origin = session, stanza = query_iq("q4", "qid4") });
			m.unload();
			assert.equal(2, #session.sent);
			assert.equal("result", session.sent[2].attr.type);
			other.unload();
		end);

		it("releases a sender waiting in an async runner", function ()
			local async = require "util.async";
			local m = load({ options = { mam_rs_max_queued_rows = 2 } }); -- The sender waits.
			local finished = false;
			local runner = async.runner(function (e)
				m.handler("pre-message/bare", 0)(e);
				finished = true;
			end);
			runner:run({ origin = fake.session("alice"), stanza = chat("alice@localhost/res", "bob@localhost", "hello") });
			assert.is_false(finished);
			m.unload();
			assert.is_true(finished);
		end);
	end);
end);
