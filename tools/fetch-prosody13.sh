#!/bin/sh
# Unpacks Prosody 13 (Debian's bookworm-backports package, the release Debian 13 ships) into
# DIR (default build/prosody13), beside the system's Prosody 0.12, which stays as it is:
#
#   DIR/root/       the package's files (dpkg -x; nothing is installed or configured)
#   DIR/bin/        prosody and prosodyctl, pointed at DIR/root's sources and modules
#
# `PATH=DIR/bin:$PATH` then runs the end-to-end suite on Prosody 13 (make test-e2e-prosody13).
# Its dependencies (lua5.4 and its expat, filesystem, socket, sec, bitop and unbound modules,
# libicu, libssl) are those of Debian 12's Prosody 0.12, which `make deps` installs. The package
# index is read into a temporary directory; the system's apt sources are not touched.
set -eu

dir=${1:-build/prosody13}
if [ -x "$dir/bin/prosody" ] && [ -f "$dir/root/usr/lib/prosody/prosody.version" ]; then
	exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
. "$(dirname "$0")/private-apt.sh"
private_apt deb "http://deb.debian.org/debian bookworm-backports main"
echo "Fetching Prosody 13 from Debian's bookworm-backports into $dir"
apt update -qq
(cd "$work" && apt download prosody/bookworm-backports)
deb=$(ls "$work"/prosody_*.deb)

rm -rf "$dir"
mkdir -p "$dir/bin"
root=$(cd "$dir" && pwd)/root
dpkg-deb -x "$deb" "$root"
for f in prosody prosodyctl; do
	sed -e "s|^CFG_SOURCEDIR=.*|CFG_SOURCEDIR='$root/usr/lib/prosody';|" \
		-e "s|^CFG_PLUGINDIR=.*|CFG_PLUGINDIR='$root/usr/lib/prosody/modules/';|" \
		"$root/usr/bin/$f" >"$dir/bin/$f"
	grep -q "^CFG_SOURCEDIR='$root/" "$dir/bin/$f" || {
		echo "fetch-prosody13: $f has no CFG_SOURCEDIR line to point at $root" >&2
		exit 1
	}
	chmod +x "$dir/bin/$f"
done
echo "Prosody $(cat "$root/usr/lib/prosody/prosody.version") in $dir"
