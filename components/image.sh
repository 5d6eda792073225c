#!/usr/bin/env bash
# Build the dpoflow image with the container engine that is here (podman or docker).
#
#   components/image.sh build IMAGE [TORCH] [BASE_IMAGE]   the image (TORCH: cuda | cpu)
#   components/image.sh base BASE_IMAGE                    a Debian bookworm base from Debian packages,
#                                                          for machines that reach package registries
#                                                          but no image registry (air-gapped clusters)
#
# Environment: ENGINE (podman | docker; default: the one found), TORCH_INDEX (an extra package index
# holding torch's build), HOST_PIP=1 (pip inside the build uses this machine's pip configuration:
# its index, mirrors, certificates and local wheel folders, mounted read-only; podman only).
set -euo pipefail
cd "$(dirname "$0")/.."

engine() {
  if [ -n "${ENGINE:-}" ]; then echo "$ENGINE"; return; fi
  for candidate in podman docker; do
    if command -v "$candidate" > /dev/null && "$candidate" info > /dev/null 2>&1; then echo "$candidate"; return; fi
  done
  echo "no container engine: install podman (Debian: apt-get install podman runc) or docker" >&2
  exit 2
}

# this machine's pip configuration as one pip.conf, and the local folders it names, as build mounts
host_pip_mounts() {
  local conf; conf=$(mktemp -d)/pip.conf
  echo "[global]" > "$conf"
  python3 -m pip config list | sed -E "s/^[^.]*\.([a-z-]+)='(.*)'$/\1 = \2/" | sort -u -t= -k1,1 >> "$conf"
  echo "-v $conf:/etc/pip.conf:ro"
  # a file:// index's pages link to files beside it: mount the folder that holds the index
  grep -oE "(file://)?/[^ ]+" "$conf" | sed -E 's|^file://(.*)/[^/]+/?$|\1|' | grep -v '^/etc/ssl/certs' | sort -u |
    while read -r path; do
      if [ -e "$path" ]; then echo "-v $path:$path:ro"; fi
    done
  if [ -d /etc/ssl/certs ]; then echo "-v /etc/ssl/certs:/etc/ssl/certs:ro"; fi
}

build() {
  local image=$1 torch=${2:-cuda} base=${3:-}
  local tool; tool=$(engine)
  local version sha
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
  sha=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git status --porcelain -- src pyproject.toml components/Dockerfile 2>/dev/null)" ]; then sha="$sha-dirty"; fi
  local args=(build -f components/Dockerfile -t "$image" --build-arg "TORCH=$torch" --build-arg "VERSION=$version"
              --build-arg "GIT_SHA=$sha" --build-arg "TORCH_INDEX=${TORCH_INDEX:-}")
  [ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
  if [ "${HOST_PIP:-0}" = 1 ]; then
    [ "$tool" = podman ] || { echo "HOST_PIP=1 needs podman (docker build has no -v)" >&2; exit 2; }
    # shellcheck disable=SC2207
    args+=(--network host $(host_pip_mounts))
  fi
  echo "$tool ${args[*]} ."
  "$tool" "${args[@]}" .
}

base() {
  local image=$1 tool; tool=$(engine)
  command -v mmdebstrap > /dev/null || { echo "mmdebstrap is missing (Debian: apt-get install mmdebstrap)" >&2; exit 2; }
  local rootfs; rootfs=$(mktemp -d)/rootfs.tar
  # python and pip on PATH, and pip allowed to install into the system Python (no EXTERNALLY-MANAGED)
  mmdebstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,git \
    --customize-hook='chroot "$1" sh -c "ln -sf python3 /usr/bin/python && ln -sf pip3 /usr/bin/pip && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED"' \
    bookworm "$rootfs"
  "$tool" import "$rootfs" "$image"
  rm -rf "$(dirname "$rootfs")"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  base) shift; base "$@" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
