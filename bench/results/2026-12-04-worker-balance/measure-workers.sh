#!/usr/bin/env bash
# per-worker CPU of the Trellis proxies for each measurement of a bench/run
# usage: threads.sh OUTDIR ONLY-REGEX [bench/run args]
set -u
out="$1"; only="$2"; shift 2
mkdir -p "$out"; : > "$out/run.log"
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
bench/run --no-build --no-install --only "$only" --duration 10 --out "$out" "$@" > "$out/run.log" 2>&1 &
run=$!
until pgrep -f -- "--workload client " >/dev/null; do sleep 0.2; kill -0 $run 2>/dev/null || exit 1; done
sleep 1
declare -A name
for w in client backend backend-h2 grpc-echo backend-tls; do p=$(pgrep -f -- "--workload $w " | head -1); [ -n "$p" ] && name[$p]=$w; done
n=0
while kill -0 $run 2>/dev/null && [ $n -lt 4000 ]; do
  now=$(date +%s.%N)
  for p in "${!name[@]}"; do
    for t in /proc/$p/task/*; do
      [ -r "$t/stat" ] || continue
      c=$(cat "$t/comm" 2>/dev/null); s=$(cut -d')' -f2- "$t/stat" 2>/dev/null) || continue
      set -- $s; echo "$now ${name[$p]} ${t##*/} $c $(( ${12} + ${13} ))"
    done
  done >> "$out/samples.txt"
  n=$((n+1)); sleep 0.5
done
wait $run
python3 - "$out" <<'PY'
import sys, re, datetime, collections
out = sys.argv[1]
log = open(f"{out}/run.log").read().splitlines()
day = datetime.datetime.utcnow().date()
marks = []
for l in log:
    m = re.match(r"\[bench (\d\d:\d\d:\d\d)\]\s+(\S+) (fixed|max) done", l)
    if m:
        t = datetime.datetime.combine(day, datetime.time.fromisoformat(m.group(1)), tzinfo=datetime.timezone.utc).timestamp()
        marks.append((t, f"{m.group(2)} {m.group(3)}"))
samples = collections.defaultdict(list)  # (proxy, comm) -> [(t, ticks)]
for l in open(f"{out}/samples.txt"):
    t, proxy, tid, comm, ticks = l.split()
    samples[(proxy, ("w" + tid) if comm.startswith("trellis-worker") else "other", tid)].append((float(t), int(ticks)))
def at(series, t):
    best = None
    for ts, v in series:
        if ts <= t: best = v
    return best
prev = None
for t, label in marks:
    if prev is not None and label.endswith("max"):
        tot = collections.defaultdict(lambda: collections.defaultdict(int))
        for (proxy, comm, tid), series in samples.items():
            a, b = at(series, prev), at(series, t)
            if a is not None and b is not None:
                tot[proxy][comm] += b - a
        cells = []
        for proxy in sorted(tot):
            if sum(tot[proxy].values()) < 20: continue
            cells.append(proxy + ": " + " ".join(f"{c.replace('trellis-','')}={v}" for c, v in sorted(tot[proxy].items())))
        print(f"{label:40s} " + " | ".join(cells))
    prev = t
PY
