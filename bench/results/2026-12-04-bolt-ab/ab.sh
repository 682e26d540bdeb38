#!/usr/bin/env bash
# Interleaved A/B: the PGO sidecar against the same build laid out by BOLT.
# PGO=the -Cprofile-use build linked with --emit-relocs; BOLT=that binary after
# llvm-bolt (scripts/pgo --bolt does the same). Round 4 ran after rounds 1-3
# because round 1's PGO run was lost (its bench/run script was edited while
# it ran and failed writing its report).
set -u
cd /work/main
ONLY='direct|trellis-1hop|haproxy-1hop|trellis-mesh|haproxy-mesh|direct-grpc-unary|trellis-mesh-grpc-unary|haproxy-mesh-grpc-unary'
for r in 1 2 3 4; do
  bench/run --no-build --no-install --only "$ONLY" --duration 10 --proxy "$PGO" --build-name release-pgo --out "/work/ab/bolt/pgo-$r" > "/work/ab/bolt/pgo-$r.log" 2>&1
  bench/run --no-build --no-install --only "$ONLY" --duration 10 --proxy "$BOLT" --build-name release-pgo-bolt --out "/work/ab/bolt/bolt-$r" > "/work/ab/bolt/bolt-$r.log" 2>&1
done
