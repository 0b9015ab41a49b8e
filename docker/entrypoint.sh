#!/bin/sh
# The image's entrypoint: turns the files mounted in the secrets directory into spendcap's
# *_FILE settings, drops settings that compose passes as empty strings (an unset optional
# variable), checks that the receipt key's directory is writable by this user, then runs
# spendcap with the given arguments.
#
#   <secrets dir>/admin-token        SPENDCAP_ADMIN_TOKEN (the file's first line)
#   <secrets dir>/x402-private-key   SPENDCAP_X402_PRIVATE_KEY_FILE
#   <secrets dir>/ap2-kek            SPENDCAP_AP2_KEK_FILE
#   <secrets dir>/acp.json           SPENDCAP_ACP_CONFIG
#   <secrets dir>/ap2.json           SPENDCAP_AP2_CONFIG
#
# The secrets directory is SPENDCAP_SECRETS_DIR (default /run/secrets/spendcap). A setting given
# in the environment wins over a file.
set -eu

secrets="${SPENDCAP_SECRETS_DIR:-/run/secrets/spendcap}"

# An optional compose variable that is not set reaches us as an empty string; spendcap would read
# it as "given, with no value".
for name in $(env | sed -n 's/^\(SPENDCAP_[A-Z0-9_]*\)=$/\1/p'); do
  unset "$name"
done

from_file() { # <file name> <variable>
  if [ -f "$secrets/$1" ] && [ -z "$(printenv "$2" || true)" ]; then
    export "$2=$secrets/$1"
  fi
}
from_file x402-private-key SPENDCAP_X402_PRIVATE_KEY_FILE
from_file ap2-kek SPENDCAP_AP2_KEK_FILE
from_file acp.json SPENDCAP_ACP_CONFIG
from_file ap2.json SPENDCAP_AP2_CONFIG
if [ -f "$secrets/admin-token" ] && [ -z "${SPENDCAP_ADMIN_TOKEN:-}" ]; then
  SPENDCAP_ADMIN_TOKEN="$(head -n 1 "$secrets/admin-token")"
  export SPENDCAP_ADMIN_TOKEN
fi

# `serve` writes its receipt key on first start: say plainly when it cannot, instead of failing
# later with a bare permission error.
if [ "${1:-serve}" = "serve" ] && [ -n "${SPENDCAP_RECEIPT_KEY:-}" ] && [ ! -e "$SPENDCAP_RECEIPT_KEY" ]; then
  dir="$(dirname "$SPENDCAP_RECEIPT_KEY")"
  if [ ! -d "$dir" ] || [ ! -w "$dir" ]; then
    echo "spendcap entrypoint: $dir is not a directory user $(id -un) can write; the receipt key $SPENDCAP_RECEIPT_KEY cannot be created there (mount a volume owned by uid $(id -u), or give an existing key)" >&2
    exit 1
  fi
fi

exec "${SPENDCAP_BIN:-spendcap}" "$@"
