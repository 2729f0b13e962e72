-- For `prosodyctl install` (luarocks). Builds the Rust library with cargo, so the host needs
-- the Rust toolchain; see README.md "Install" for the plain `make install` alternative.
rockspec_format = "3.0"
package = "mod_mam_rs"
version = "0.1.0-1"
source = {
	-- Made by `make dist`; point this at wherever the tarball is served from.
	url = "file://mod_mam_rs-0.1.0.tar.gz",
	dir = "mod_mam_rs-0.1.0",
}
description = {
	summary = "XEP-0313 Message Archive Management for Prosody, a faster drop-in for mod_mam",
	detailed = [[
		mod_mam_rs keeps mod_mam's options and behaviour, and does the storage and the
		archive queries on its own threads (Rust), so large archives never block Prosody.
	]],
	license = "MIT",
}
dependencies = { "lua >= 5.4, < 5.5" }
build = {
	type = "command",
	build_command = "cargo build --release --locked && cp target/release/libmam_rs_native.so mam_rs_native.so",
	install = {
		-- Prosody finds commands.lib.lua as share/lua/5.4/mod_mam_rs/commands.lua.
		lua = { mod_mam_rs = "lua/mod_mam_rs.lua", ["mod_mam_rs.commands"] = "lua/commands.lib.lua" },
		lib = { mam_rs_native = "mam_rs_native.so" },
	},
}
