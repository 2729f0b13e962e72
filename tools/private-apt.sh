# Sourced by tools/fetch-prosody13.sh and tools/build-lua-debug.sh: `apt` runs apt-get on a
# package index of its own in $work (a temporary directory the caller made), read from the one
# sources.list line given to private_apt, signed by Debian's archive keyring. The system's apt
# sources, lists and cache are not touched.

private_apt() {
	mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
	echo "$1 [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $2" >"$work/sources.list"
}

apt() {
	apt-get -q -o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=- \
		-o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" \
		-o APT::Sandbox::User="$(id -un)" -o Debug::NoLocking=1 "$@"
}
