#!/bin/sh
# Builds a Lua 5.4 interpreter with symbols into DIR (default build/lua-debug) for
# `make bench-profile`, from the upstream sources of the Debian lua5.4 installed here: Debian's
# binary has no symbols, so callgrind sees its interpreter, collector and string library as
# addresses. The sources come from Debian's signed Sources index, read into a temporary
# directory (the system's apt sources are not touched); Debian's patches are not applied, and
# the build is upstream's (`make linux`, -O2) with -g. Only for profiling: Prosody's C modules
# load into it as into Debian's, and the run sets Debian's module paths (bench_instr.py --lua).
set -eu

dir=${1:-build/lua-debug}
if [ -x "$dir/lua" ]; then
	exit 0
fi
version=$(dpkg-query -W -f '${Version}' lua5.4)
upstream=${version%-*}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
. "$(dirname "$0")/private-apt.sh"
private_apt deb-src "http://deb.debian.org/debian bookworm main"
echo "Building Lua $upstream with symbols (the sources of Debian's lua5.4 $version) into $dir"
apt update -qq
(cd "$work" && apt source --download-only -qq "lua5.4=$version")
tar -xzf "$work/lua5.4_$upstream.orig.tar.gz" -C "$work"
make -s -C "$work/lua-$upstream" linux MYCFLAGS=-g >/dev/null 2>"$work/build.log" || {
	cat "$work/build.log" >&2
	exit 1
}
mkdir -p "$dir"
cp "$work/lua-$upstream/src/lua" "$dir/lua"
"$dir/lua" -v
