#!/usr/bin/env bash
# Build the Dockerfile for real without a Docker engine, and run the image.
#
# buildah (Debian) builds with vfs storage and chroot isolation. No registry is reachable here, so the
# CUDA base is replaced (--build-arg BASE_IMAGE) by a local Debian 12 base made with mmdebstrap; every
# other step of the Dockerfile runs as written. Then, inside the image: `tread-scale --help` and the
# demo's first steps (embedded S3 server, MDS conversion, 2 training batches, sampling).
# vfs storage copies the whole root filesystem per layer, so the build runs in one working container (no
# --layers) and everything is removed afterwards: it needs about 25 GB of free disk while it runs.
# On success it records the hash of the build inputs in docker/build.verified; `.ci/run` rebuilds only
# when that hash no longer matches (the build downloads several GB and takes a while).
#   scripts/docker_build_check.sh              # build + smoke run
#   scripts/docker_build_check.sh --if-stale   # only when the inputs changed since the last verified build
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${DOCKER_CHECK_DIR:-${TMPDIR:-/tmp}/tread-docker-check}"
say() { echo "[docker_build_check] $*" >&2; }
mkdir -p "$WORK"

inputs_hash() { (cd "$REPO" && cat Dockerfile .dockerignore requirements.lock pyproject.toml docker/entrypoint.sh | sha256sum | cut -c1-16); }
if [ "${1:-}" = "--if-stale" ] && [ "$(inputs_hash)" = "$(cat "$REPO/docker/build.verified" 2>/dev/null)" ]; then
  say "image inputs unchanged since the last verified build ($(inputs_hash)); skipping the build"
  exit 0
fi

if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
  say "installing buildah and mmdebstrap (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah mmdebstrap >/dev/null
fi
B=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
BASE=localhost/tread-base:bookworm
if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  say "making a local Debian 12 base image with mmdebstrap"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm "$WORK/base.tar" http://deb.debian.org/debian
  c=$("${B[@]}" from scratch)
  "${B[@]}" add "$c" "$WORK/base.tar" / >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 "$c"
  "${B[@]}" commit -q "$c" "$BASE" >/dev/null
  "${B[@]}" rm "$c" >/dev/null
  rm -f "$WORK/base.tar"
fi
TAG=localhost/tread-scale:check
say "building $REPO/Dockerfile on $BASE"
"${B[@]}" bud --format docker --isolation chroot --pull=never --build-arg "BASE_IMAGE=$BASE" \
  -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  -f "$REPO/Dockerfile" -t "$TAG" "$REPO"
c=$("${B[@]}" from --pull-never "$TAG")
trap '"${B[@]}" rm "$c" >/dev/null 2>&1 || true; "${B[@]}" rmi -f "$TAG" >/dev/null 2>&1 || true' EXIT
say "smoke run: tread-scale --help"
"${B[@]}" run --isolation chroot --user 1000:1000 "$c" -- /opt/tread_scale/docker/entrypoint.sh --help | head -5
say "smoke run: the demo's first steps"
"${B[@]}" run --isolation chroot --user 1000:1000 --workingdir /opt/tread_scale "$c" -- \
  /opt/tread_scale/docker/entrypoint.sh demo output_dir=/tmp/runs train.max_duration=2ba train.save_interval=2ba \
  sampling.every=null sampling.steps=2
inputs_hash > "$REPO/docker/build.verified"
say "OK: image built and ran; recorded $(cat "$REPO/docker/build.verified") in docker/build.verified"
