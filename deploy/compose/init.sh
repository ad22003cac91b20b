#!/bin/sh
# One-shot set-up for docker-compose.yml: key pairs, the enrollment file, the broker's
# configuration (TLS certificate, ACL, password file) and one password per service, written
# into ./secrets on the host (`docker compose run --rm init`, before `docker compose up`).
# Each service then gets only its own files as compose `secrets:` (see docker-compose.yml).
# Idempotent: existing keys, passwords and the broker's CA are kept, so it can be re-run.
# On a real plant, each site runs its own `fedline keys new` on its gateway and sends only
# the .pub.json file to the operator of the aggregator (see deploy/README.md).
set -eu
umask 077
SECRETS=${SECRETS:-/var/lib/fedline/secrets}
FEDERATION=plant
SITES="L M H"
FEDLINE_UID=10001     # the fedline user of the image (Dockerfile)
MOSQUITTO_UID=1883    # the mosquitto user of the eclipse-mosquitto image
mkdir -p "$SECRETS/keys" "$SECRETS/broker"

if [ ! -f "$SECRETS/keys/aggregator.key" ]; then
  fedline keys new --role aggregator --id aggregator --out "$SECRETS/keys/aggregator.key"
fi
for site in $SITES; do
  if [ ! -f "$SECRETS/keys/$site.key" ]; then
    fedline keys new --role site --id "$site" --out "$SECRETS/keys/$site.key"
  fi
done
if [ ! -f "$SECRETS/keys/enrollment.json" ]; then
  fedline keys enroll --federation "$FEDERATION" --aggregator "$SECRETS/keys/aggregator.pub.json" \
    --site "$SECRETS/keys/L.pub.json" --site "$SECRETS/keys/M.pub.json" --site "$SECRETS/keys/H.pub.json" \
    --out "$SECRETS/keys/enrollment.json"
fi
# TLS only (8883); the certificate names the compose service and localhost; the store lives in
# the image's own /mosquitto/data (owned by its mosquitto user, so a new volume is writable)
fedline broker config --enrollment "$SECRETS/keys/enrollment.json" --out "$SECRETS/broker" \
  --bind 0.0.0.0 --port 8883 --host mosquitto --host localhost --persistence-dir /mosquitto/data \
  --credentials-dir "$SECRETS/credentials" --user mosquitto --keep-passwords

# public files: readable by every service
chmod 0755 "$SECRETS" "$SECRETS/keys" "$SECRETS/broker" "$SECRETS/broker/pki"
chmod 0700 "$SECRETS/credentials"
chmod 0644 "$SECRETS/keys/enrollment.json" "$SECRETS"/keys/*.pub.json "$SECRETS/broker/pki/ca.crt"
# private files: 0600, owned by the one user that reads them
chmod 0600 "$SECRETS"/keys/*.key "$SECRETS"/credentials/*.password "$SECRETS/broker/passwd" \
  "$SECRETS/broker/pki/ca.key" "$SECRETS/broker/pki/server.key"
if [ "$(id -u)" = 0 ]; then
  chown -R "$MOSQUITTO_UID:$MOSQUITTO_UID" "$SECRETS/broker"
  chown root:root "$SECRETS/broker/pki/ca.key"          # the CA key is read by nobody at run time
  chown -R "$FEDLINE_UID:$FEDLINE_UID" "$SECRETS/keys" "$SECRETS/credentials"
fi
echo "init: secrets ready in $SECRETS (run: docker compose up -d)"
