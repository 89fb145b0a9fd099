#!/bin/bash
# Writes into $1 (once): a random SASL password, a self-signed certificate for the broker
# "kafka" (broker.p12, password in keystore-password) and its PEM (ca.crt) for clients.
set -euo pipefail
out=$1
if [[ -s $out/password && -s $out/broker.p12 ]]; then exit 0; fi
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$out/password"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$out/keystore-password"
rm -f "$out/broker.p12"
keytool -genkeypair -alias kafka -keyalg RSA -keysize 2048 -validity 825 \
  -dname "CN=kafka" -ext "SAN=dns:kafka,dns:localhost" -storetype PKCS12 \
  -keystore "$out/broker.p12" -storepass "$(cat "$out/keystore-password")"
keytool -exportcert -rfc -alias kafka -keystore "$out/broker.p12" \
  -storepass "$(cat "$out/keystore-password")" -file "$out/ca.crt"
# Readable by the raft-stream (UID 10001) and kafka (UID 1000) containers.
chmod 0444 "$out/password" "$out/keystore-password" "$out/broker.p12" "$out/ca.crt"
