#!/usr/bin/env bash
# interleaved A/B: base (TRELLIS_PROTO_NOPLACE=1) vs placed
set -u
cd /work/main
M=bench/results/2026-12-04-worker-balance/measure-workers.sh
ONLY='direct|trellis-1hop|haproxy-1hop|trellis-mesh|haproxy-mesh|direct-grpc-unary|trellis-mesh-grpc-unary|haproxy-mesh-grpc-unary|direct-churn|trellis-mesh-churn|haproxy-mesh-churn'
for r in 1 2 3; do
  TRELLIS_PROTO_NOPLACE=1 bash $M /work/ab/base-$r "$ONLY" > /work/ab/base-$r.workers 2>&1
  bash $M /work/ab/placed-$r "$ONLY" > /work/ab/placed-$r.workers 2>&1
done
echo done > /work/ab/DONE
