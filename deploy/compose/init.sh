#!/bin/sh
# One-shot set-up for docker-compose.yml (the `init` service): key pairs, the enrollment
# file and the broker's config/ACL/password file, written into the `secrets` volume.
# Idempotent: existing keys and passwords are kept, so `docker compose up` can be re-run.
# On a real plant, each site runs its own `fedline keys new` on its gateway and sends only
# the .pub.json file to the operator of the aggregator (see deploy/README.md).
set -eu
SECRETS=${SECRETS:-/var/lib/fedline/secrets}
FEDERATION=plant
SITES="L M H"
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
fedline broker config --enrollment "$SECRETS/keys/enrollment.json" --out "$SECRETS/broker" --bind 0.0.0.0 --port 8883 --host mosquitto --host localhost --user mosquitto --keep-passwords
# the broker container runs as uid 1883 (mosquitto); the fedline containers as uid 10001 (fedline)
chmod 0755 "$SECRETS/broker" "$SECRETS/broker/credentials"
chmod 0644 "$SECRETS"/broker/credentials/*.password
if [ "$(id -u)" = 0 ]; then
  chown -R 1883:1883 "$SECRETS/broker"
  chown -R 10001:10001 "$SECRETS/keys"
fi
echo "init: secrets ready in $SECRETS"
