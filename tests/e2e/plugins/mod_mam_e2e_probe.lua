-- Test-only plugin for tests/e2e (test_events.py). Not for production.
--
-- Records the archive events fired by mod_mam / mod_mam_rs and lets a message decide its own
-- fate through a marker child:
--   <decide xmlns="urn:e2e:mam-probe" store="false"/>  -> vetoes archiving (handler returns false)
--   <decide xmlns="urn:e2e:mam-probe" store="true"/>   -> forces archiving (handler returns true)
-- The archive-should-store handler runs at priority 10, above the stock classifier (-1).
--
-- Query what was seen with  <iq type="get" to="HOST"><events xmlns="urn:e2e:mam-probe"/></iq>
-- Reply: <events xmlns="urn:e2e:mam-probe"><event name=... [attrs]><message .../></event>...</events>
-- (attributes: session / origin = full JID of the session in the event, reason = event.reason
-- as left on the payload by the lower-priority handlers, for_user, id, archive_id_meta, ...).

local st = require "util.stanza";

local xmlns_probe = "urn:e2e:mam-probe";
local seen = {};

local function session_jid(session)
	if not session then return nil end
	return session.full_jid or session.host;
end

module:hook("archive-should-store", function (event)
	local stanza = event.stanza;
	table.insert(seen, {
		name = "archive-should-store";
		payload = event; -- reason is read at query time, after the stock handler has set it
		attr = { session = session_jid(event.session), session_type = event.session and event.session.type };
		stanza = st.clone(stanza);
	});
	local decide = stanza:get_child("decide", xmlns_probe);
	if decide then
		if decide.attr.store == "false" then return false; end
		if decide.attr.store == "true" then return true; end
	end
end, 10);

module:hook("archive-message-added", function (event)
	table.insert(seen, {
		name = "archive-message-added";
		attr = { for_user = event.for_user, id = event.id, origin = session_jid(event.origin) };
		stanza = event.stanza and st.clone(event.stanza);
	});
end);

-- Trunk-only API (absent in 0.12): recorded if anybody fires it.
module:hook("archive-query", function (event)
	table.insert(seen, {
		name = "archive-query";
		attr = {
			origin = session_jid(event.origin);
			start_time = event.start_time ~= nil and tostring(event.start_time) or nil;
			end_id = event.end_id ~= nil and tostring(event.end_id) or nil;
		};
	});
end);

-- Trunk-only stanza meta (util.stanza get_meta/set_meta do not exist in 0.12).
local function record_meta(event)
	local stanza = event.stanza;
	if stanza and stanza.get_meta then
		local archive_id = stanza:get_meta("archive-id");
		table.insert(seen, {
			name = "archive-id-meta";
			attr = { id = stanza.attr.id, archive_id = archive_id ~= nil and tostring(archive_id) or nil,
				origin = session_jid(event.origin) };
		});
	end
end
-- After archiving (0) and mod_carbons (-0.5), before the stanza-id strip (-1).
module:hook("pre-message/bare", record_meta, -0.75);
module:hook("pre-message/full", record_meta, -0.75);

module:hook("iq-get/host/" .. xmlns_probe .. ":events", function (event)
	local reply = st.reply(event.stanza):tag("events", { xmlns = xmlns_probe });
	for _, rec in ipairs(seen) do
		local attr = { name = rec.name };
		for k, v in pairs(rec.attr) do attr[k] = tostring(v); end
		if rec.payload and rec.payload.reason ~= nil then
			attr.reason = tostring(rec.payload.reason);
		end
		reply:tag("event", attr);
		if rec.stanza then
			local copy = st.clone(rec.stanza);
			copy.attr.xmlns = copy.attr.xmlns or "jabber:client";
			reply:add_child(copy);
		end
		reply:up();
	end
	event.origin.send(reply);
	return true;
end);

module:log("info", "mam e2e probe loaded");
