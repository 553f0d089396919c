#!/bin/sh
# Container entrypoint: `docker run IMAGE train CONFIG key=value`, `... convert ...`, `... sample ...`,
# `... dry-run ...`, `... demo`; anything else (composer, python, bash) runs as given.
set -e
case "${1:-}" in
  train|convert|sample|dry-run|-h|--help) exec tread-scale "$@" ;;
  demo) shift; exec python -m tread_scale.devtools.demo "$@" ;;
  *) exec "$@" ;;
esac
