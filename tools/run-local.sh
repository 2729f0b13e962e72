#!/usr/bin/env bash
# `make run`: a local Prosody on 127.0.0.1 with mod_mam_rs on its embedded SQLite archive and
# two ready accounts. Everything lives in build/run/ (config, data, certificate, accounts), so
# the archive and the passwords survive from one run to the next. Ctrl-C stops it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
run="$repo/build/run"
domain=${RUN_DOMAIN:-localhost}
c2s_port=${RUN_C2S_PORT:-5222}
mkdir -p "$run/data" "$run/certs"
chmod 750 "$run/data"

if ! [ -s "$run/certs/$domain.crt" ] && command -v openssl >/dev/null; then
	openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$domain" \
		-addext "subjectAltName=DNS:$domain" \
		-keyout "$run/certs/$domain.key" -out "$run/certs/$domain.crt" 2>/dev/null
fi
tls=""
if [ -s "$run/certs/$domain.crt" ]; then
	tls="ssl = { certificate = \"$run/certs/$domain.crt\"; key = \"$run/certs/$domain.key\"; }"
fi
run_as_root=false
[ "$(id -u)" = 0 ] && run_as_root=true

cat > "$run/prosody.cfg.lua" <<CFG
-- Written by tools/run-local.sh for \`make run\`.
run_as_root = $run_as_root
pidfile = "$run/prosody.pid"
data_path = "$run/data"
plugin_paths = { "$repo/build/plugins" }
interfaces = { "127.0.0.1" }
c2s_ports = { $c2s_port }
s2s_ports = { }
http_ports = { }
https_ports = { }
network_settings = { nagle = false }
log = { { levels = { min = "info" }, to = "console" } }
authentication = "internal_hashed"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
modules_enabled = {
	"roster"; "saslauth"; "tls"; "disco"; "carbons"; "pep"; "private"; "blocklist";
	"vcard4"; "vcard_legacy"; "version"; "uptime"; "time"; "ping"; "smacks"; "csi_simple";
	"offline"; "mam_rs";
}
modules_disabled = { "s2s" }
$tls

VirtualHost "$domain"
CFG

accounts="$run/accounts.txt"
if ! [ -s "$accounts" ]; then
	: > "$accounts"
	for user in alice bob; do
		pw=$(head -c 12 /dev/urandom | base64 | tr -d '/+=' | head -c 12)
		prosodyctl --config "$run/prosody.cfg.lua" register "$user" "$domain" "$pw"
		echo "$user@$domain $pw" >> "$accounts"
	done
fi

cat <<TEXT

mod_mam_rs is running in a local Prosody:
  server   127.0.0.1, port $c2s_port (STARTTLS with a self-signed certificate, or plain)
  archive  $run/data/mam_rs.sqlite
  accounts (JID and password):
$(sed 's/^/    /' "$accounts")
Connect a client (Gajim, Dino, Conversations...) as one account, chat with the other, and scroll
back: history comes from the archive. Ctrl-C stops the server.

TEXT
exec prosody -F --config "$run/prosody.cfg.lua"
