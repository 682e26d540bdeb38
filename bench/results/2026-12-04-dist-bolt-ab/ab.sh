#!/usr/bin/env bash
# Interleaved: the sidecar built by scripts/pgo --bolt in the release profile (thin LTO)
# against scripts/pgo --profile dist --bolt (fat LTO, one codegen unit), same code.
set -u
cd /work/main
ONLY='direct|trellis-1hop|haproxy-1hop|trellis-mesh|haproxy-mesh|direct-grpc-unary|trellis-mesh-grpc-unary|haproxy-mesh-grpc-unary'
R=/work/main/target/release/trellis-proxy-pgo-bolt
D=/work/main/target/dist/trellis-proxy-pgo-bolt
run() { # name binary round
  bench/run --no-build --no-install --only "$ONLY" --duration 10 --proxy "$2" \
    --build-name "$1-pgo-bolt" --out "/work/ab/dist/$1-$3" > "/work/ab/dist/$1-$3.log" 2>&1
}
for r in 1 2 3; do
  if [ $((r % 2)) = 1 ]; then run release "$R" $r; run dist "$D" $r; else run dist "$D" $r; run release "$R" $r; fi
done
for b in release dist; do
  bin=$R; [ $b = dist ] && bin=$D
  sync; echo 3 > /proc/sys/vm/drop_caches
  bench/sidecar-rss --no-build --runs 3 --proxy "$bin" > "/work/ab/dist/rss-$b.txt" 2>&1
done
echo done > /work/ab/dist/DONE
