#!/usr/bin/env bash
# Interleaved: one release build of trellis-proxy, the kernel's default time slice
# (TRELLIS_PROXY_SCHED_SLICE_US=0) against a 100 µs slice per worker thread.
set -u
cd /work/main
ONLY='direct|trellis-mesh|haproxy-mesh|direct-grpc-unary|trellis-mesh-grpc-unary|haproxy-mesh-grpc-unary'
B=/tmp/tp-slice
run() { # name slice round
  TRELLIS_PROXY_SCHED_SLICE_US=$2 bench/run --no-build --no-install --only "$ONLY" --duration 10 --proxy "$B" \
    --build-name "release-slice-$2" --out "/work/ab/slice/$1-$3" > "/work/ab/slice/$1-$3.log" 2>&1
}
for r in 1 2 3 4; do
  if [ $((r % 2)) = 1 ]; then run s0 0 $r; run s100 100 $r; else run s100 100 $r; run s0 0 $r; fi
done
echo done > /work/ab/slice/DONE
