#!/usr/bin/env bash
# Interleaved: the PGO + BOLT sidecar with its default workers (2 on 2 cores) against --proxy-workers 1.
set -u
cd /work/main
ONLY='direct|trellis-mesh|haproxy-mesh|direct-grpc-unary|trellis-mesh-grpc-unary|haproxy-mesh-grpc-unary'
B=/work/main/target/release/trellis-proxy-pgo-bolt
for r in 1 2 3; do
  bench/run --no-build --no-install --only "$ONLY" --duration 10 --proxy "$B" --build-name release-pgo-bolt-w2 --out "/work/ab/w1/w2-$r" > "/work/ab/w1/w2-$r.log" 2>&1
  bench/run --no-build --no-install --only "$ONLY" --duration 10 --proxy "$B" --proxy-workers 1 --build-name release-pgo-bolt-w1 --out "/work/ab/w1/w1-$r" > "/work/ab/w1/w1-$r.log" 2>&1
done
echo done > /work/ab/w1/DONE
