-- For tests/e2e/bench/alloc.py: stops Lua's garbage collector, so that the heap only grows by
-- what is allocated, and logs the heap's size ("heap N bytes") when a message whose body is
-- "heap" comes to the host. Never load it on a real server: nothing would ever be collected.
collectgarbage("stop");

module:hook("message/host", function (event)
	if event.stanza:get_child_text("body") ~= "heap" then return; end
	module:log("info", "heap %d bytes", math.floor(collectgarbage("count") * 1024));
	return true;
end, 100);
