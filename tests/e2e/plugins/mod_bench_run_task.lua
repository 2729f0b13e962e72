-- Benchmark-only plugin (tests/e2e/bench): runs one of the host's periodic (mod_cron) tasks at a
-- chosen time after start, the way mod_cron runs it (in an async runner, on the event loop), and
-- logs when it started and ended. `make bench` uses it to start stock mod_mam's expiry ("Remove
-- expired messages", a daily task) while another client pings, instead of waiting for a day.
--
-- Options (on the VirtualHost or global):
--   bench_run_task = "mam/remove_expired_messages"   the task id (mod_cron's <module>/<name>)
--   bench_run_task_after = 10                         seconds after this module loads
-- Log lines (info): "bench_run_task: <id> started at <unix time>" and
--                   "bench_run_task: <id> finished at <unix time> (<seconds> s)"

local async = require "util.async";
local time_now = require "util.time".now;

local task_id = module:get_option_string("bench_run_task");
local after = module:get_option_number("bench_run_task_after", 10);

if not task_id then return; end

local runner = async.runner(function (task)
	local started = time_now();
	module:log("info", "bench_run_task: %s started at %.6f", task.id, started);
	task:run(os.time());
	local finished = time_now();
	module:log("info", "bench_run_task: %s finished at %.6f (%.3f s)", task.id, finished, finished - started);
end);

module:add_timer(after, function ()
	for _, task in ipairs(module:get_host_items("task")) do
		if task.id == task_id then
			runner:run(task);
			return;
		end
	end
	module:log("error", "bench_run_task: no task %q on this host", task_id);
end);
