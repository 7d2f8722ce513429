#!/usr/bin/env bash
# Builds the container image and checks that a container of it turns healthy and
# answers /healthz. Needs a Docker daemon; .ci/run calls it only when one answers.
set -euo pipefail
cd "$(dirname "$0")/.."

image=keygate-server:ci
name=keygate-ci-$$
docker build --pull=false -t "$image" .
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
docker run -d --name "$name" --read-only --tmpfs /tmp \
  -e KEYGATE_ADMIN_TOKEN="ci-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" \
  -e KEYGATE_SERVICE_TOKEN="ci-service-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" \
  "$image" >/dev/null

# The image's own HEALTHCHECK (the binary's `healthcheck` subcommand) decides.
for _ in $(seq 1 60); do
  status=$(docker inspect -f '{{.State.Health.Status}}' "$name" 2>/dev/null || echo gone)
  case "$status" in
    healthy) break ;;
    unhealthy|gone) docker logs "$name" || true; echo "container is $status"; exit 1 ;;
  esac
  sleep 1
done
[ "$status" = healthy ] || { docker logs "$name" || true; echo "not healthy after 60 s"; exit 1; }
# And /healthz itself, from inside the container, as a user of it would see it.
docker exec "$name" keygate-server healthcheck --url http://127.0.0.1:7700/healthz
user=$(docker exec "$name" id -u)
[ "$user" != 0 ] || { echo "the container runs as root"; exit 1; }
echo "image ok: healthy, /healthz answers, runs as uid $user"
