#!/usr/bin/env bash
set -u
cd /work/main
ONLY='direct|trellis-1hop|haproxy-1hop|trellis-mesh|haproxy-mesh|direct-grpc-unary|trellis-mesh-grpc-unary|haproxy-mesh-grpc-unary|direct-churn|trellis-mesh-churn|haproxy-mesh-churn'
for r in 1 2 3; do
  bench/run --no-build --no-install --only "$ONLY" --duration 10 --proxy target/release/trellis-proxy-pgo --build-name release-pgo --out /work/ab/pgo-$r > /work/ab/pgo-$r.log 2>&1
done
echo done > /work/ab/PGO_DONE
