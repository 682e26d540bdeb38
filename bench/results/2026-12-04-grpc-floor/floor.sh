#!/usr/bin/env bash
# The machine's floor for gRPC unary p99 added by two extra processes on the
# path: ghz -> HAProxy (mode tcp, plain) -> HAProxy (mode tcp, plain) -> grpc-go,
# against ghz -> grpc-go, interleaved, at 1,000 calls/s as bench/run runs it
# (ghz --async --rps 1000 -c 4 --connections 4). No TLS, no HTTP: the least
# two relays can do.
set -u
D=${OUT:-/tmp/grpc-floor}; mkdir -p "$D"
# run from the repository root; the pinned peers come from scripts/test-peers
GHZ="$(scripts/test-peers ghz)"
ECHO="$(scripts/test-peers grpc-echo)"
DUR=${DUR:-20}
python3 -c 'import base64, json; print(json.dumps({"response_size": 100, "payload": {"body": base64.b64encode(b"m" * 100).decode()}}))' >"$D/unary.json"
"$ECHO" -addr 127.0.0.1:50151 >"$D/echo.log" 2>&1 & EP=$!
relay() { cat >"$D/$1.cfg" <<CFG
global
  nbthread 2
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:$2
  default_backend be
backend be
  server s 127.0.0.1:$3
CFG
haproxy -f "$D/$1.cfg" >"$D/$1.log" 2>&1 & }
relay b 50162 50151; BP=$!
relay a 50161 50162; AP=$!
sleep 1
call() { # name port round
  "$GHZ" --insecure -c 4 --connections 4 -z 2s --call grpc.testing.TestService/UnaryCall -D "$D/unary.json" "127.0.0.1:$2" >/dev/null 2>&1
  "$GHZ" --insecure --async --rps 1000 -c 4 --connections 4 -z "${DUR}s" --duration-stop ignore -O json -o "$D/$1-$3.json" \
    --call grpc.testing.TestService/UnaryCall -D "$D/unary.json" "127.0.0.1:$2" 2>"$D/$1-$3.err"
}
for r in 1 2 3 4 5 6; do
  if [ $((r % 2)) = 1 ]; then call direct 50151 $r; call l4x2 50161 $r; else call l4x2 50161 $r; call direct 50151 $r; fi
done
kill $EP $AP $BP
python3 - "$D" <<'PY'
import json,sys
d=sys.argv[1]
def q(f,p):
    j=json.load(open(f))
    return {x['percentage']:x['latency']/1e6 for x in j['latencyDistribution']}[p]
print("round  direct p50  direct p99  l4x2 p50  l4x2 p99  added p50  added p99")
for r in range(1,7):
    dp50,dp99=q(f"{d}/direct-{r}.json",50),q(f"{d}/direct-{r}.json",99)
    lp50,lp99=q(f"{d}/l4x2-{r}.json",50),q(f"{d}/l4x2-{r}.json",99)
    print(f"{r:5} {dp50:11.3f} {dp99:11.3f} {lp50:9.3f} {lp99:9.3f} {lp50-dp50:10.3f} {lp99-dp99:10.3f}")
PY
