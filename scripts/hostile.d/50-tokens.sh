#!/usr/bin/env bash
# Issue 26, item 5: tokens without bounds. Against a release server in token mode:
#   - `eventqueue token --ttl 99999999999999d` (and --ttl 31d): refused or minted;
#   - a hand-signed token with exp = 2^64-1, one valid for a year, one without exp: the answers;
#   - a token that works, then `eventqueue revoke --tenant acme` with an admin token: the same
#     token's answer right after, and after a restart of the server.
# EVENTQUEUE_BIN_BEFORE=<older binary> runs the same against it. Loopback only; a few requests.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
secret_file="$HOSTILE_TMP/jwt.secret"
head -c 32 /dev/urandom | base64 >"$secret_file"

# tok_server BIN NAME: a token-mode server on a free port over $HOSTILE_TMP/NAME (kept across
# restarts); sets SERVER_PID, SERVER_URL.
tok_server() {
    launch_server "" "$1" "$2" --jwt-secret-file "$secret_file"
}

# sign CLAIMS_JSON: an HS256 token over the secret, whatever the claims (Python stdlib).
sign() {
    python3 - "$secret_file" "$1" <<'PY'
import base64, hashlib, hmac, sys
secret = open(sys.argv[1], "rb").read().strip()
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
signing = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(sys.argv[2].encode())
sig = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
print(signing + "." + b64(sig))
PY
}

# answer TOKEN: "STATUS detail" of GET /events/queues with TOKEN.
answer() {
    curl -sS -o "$HOSTILE_TMP/answer.json" -w '%{http_code}' -H "Authorization: Bearer $1" \
        "$SERVER_URL/events/queues"
    echo " $(head -c 160 "$HOSTILE_TMP/answer.json")"
}

run() {
    local label="$1" bin="$2" now
    echo "### $label"
    now="$(date +%s)"
    for ttl in 99999999999999d 31d; do
        if out="$("$bin" token --jwt-secret-file "$secret_file" --tenant acme --ttl "$ttl" 2>&1)"; then
            echo "token --ttl $ttl: minted"
        else
            echo "token --ttl $ttl: refused: ${out##*ERROR }"
        fi
    done
    tok_server "$bin" "tokens-$label"
    echo "exp = 2^64-1: $(answer "$(sign "{\"tenant_id\":\"acme\",\"scope\":\"subscribe\",\"iat\":$now,\"exp\":18446744073709551615}")")"
    echo "valid for 365 days: $(answer "$(sign "{\"tenant_id\":\"acme\",\"scope\":\"subscribe\",\"iat\":$now,\"exp\":$((now + 365 * 86400))}")")"
    echo "no exp: $(answer "$(sign '{"tenant_id":"acme","scope":"subscribe"}')")"
    local user admin
    user="$("$bin" token --jwt-secret-file "$secret_file" --tenant acme --ttl 1h)"
    admin="$("$bin" token --jwt-secret-file "$secret_file" --tenant ops --scope admin --ttl 1h)"
    echo "a 1 h token of acme: $(answer "$user")"
    sleep 1
    if out="$("$bin" revoke --url "$SERVER_URL" --token "$admin" --tenant acme 2>&1)"; then
        echo "revoke --tenant acme: $out"
    else
        echo "revoke --tenant acme: failed: $out"
    fi
    echo "the same token after the revocation: $(answer "$user")"
    echo "a token minted after it: $(sleep 1; answer "$("$bin" token --jwt-secret-file "$secret_file" --tenant acme --ttl 1h)")"
    stop_server "$SERVER_PID"
    tok_server "$bin" "tokens-$label"
    echo "the revoked token after a restart: $(answer "$user")"
    stop_server "$SERVER_PID"
}

if [[ -n "${EVENTQUEUE_BIN_BEFORE:-}" ]]; then
    run before "$EVENTQUEUE_BIN_BEFORE"
fi
run after "$EVENTQUEUE_BIN"
