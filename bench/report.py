#!/usr/bin/env python3
"""Turn the raw output of bench/run into a Markdown table and a JSON file.

usage: report.py RAW_DIR OUT_BASENAME   (writes OUT_BASENAME.md and .json, prints the Markdown)
"""
import json
import os
import re
import sys

raw, out = sys.argv[1], sys.argv[2]
env = json.load(open(os.path.join(raw, "env.json")))
scenarios = [l.rstrip("\n").split("|") for l in open(os.path.join(raw, "scenarios.txt")) if l.strip()]


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def parse_oha(path):
    d = json.load(open(path))
    lp = d.get("latencyPercentiles", {})
    codes = {str(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    total = sum(codes.values())
    # requests cut off by the end of -z are not errors
    errors = sum(v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k)
    ms = lambda v: None if v is None else v * 1000.0
    return {
        "p50_ms": ms(lp.get("p50")), "p90_ms": ms(lp.get("p90")),
        "p99_ms": ms(lp.get("p99")), "p99_9_ms": ms(lp.get("p99.9")),
        "requests": total, "ok": ok, "errors": errors + (total - ok),
        "rps": d.get("summary", {}).get("requestsPerSec"),
    }


def parse_h2load(out_path, log_path, duration):
    text = open(out_path).read()
    lat = []
    ok = total = 0
    if os.path.exists(log_path):
        for line in open(log_path):
            parts = line.split()
            if len(parts) < 3:
                continue
            total += 1
            if parts[1].startswith("2"):
                ok += 1
            lat.append(int(parts[2]) / 1000.0)
    lat.sort()
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    rps = float(m.group(3)) if m else (total / duration if duration else None)
    m2 = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    failed = int(m2.group(5)) + int(m2.group(6)) if m2 else 0
    return {
        "p50_ms": pct(lat, 0.50), "p90_ms": pct(lat, 0.90), "p99_ms": pct(lat, 0.99), "p99_9_ms": pct(lat, 0.999),
        "requests": total, "ok": ok, "errors": failed + (total - ok), "rps": rps,
    }


def parse_ghz(path):
    """ghz -O json: per-call details (latency in ns) and status counts."""
    d = json.load(open(path))
    codes = d.get("statusCodeDistribution") or {}
    ok = codes.get("OK", 0)
    total = d.get("count") or sum(codes.values())
    lat = sorted(x["latency"] / 1e6 for x in (d.get("details") or []) if x.get("status") == "OK")
    if lat:
        p = {q: pct(lat, q) for q in (0.50, 0.90, 0.99, 0.999)}
    else:  # no details: ghz's own percentiles (no p99.9)
        dist = {x["percentage"]: x["latency"] / 1e6 for x in (d.get("latencyDistribution") or [])}
        p = {0.50: dist.get(50), 0.90: dist.get(90), 0.99: dist.get(99), 0.999: None}
    rps = d.get("rps")
    return {
        "p50_ms": p[0.50], "p90_ms": p[0.90], "p99_ms": p[0.99], "p99_9_ms": p[0.999],
        "requests": total, "ok": ok, "errors": total - ok,
        # successful calls per second
        "rps": rps * ok / total if rps and total else rps,
    }


PARSERS = {
    "oha": lambda base, env: parse_oha(base + ".out"),
    "h2load": lambda base, env: parse_h2load(base + ".out", base + ".log", env["duration_s"]),
    "ghz": lambda base, env: parse_ghz(base + ".out"),
}

def read_counts(path):
    """perf stat -x, output (bench/run --counts): {event: count}."""
    if not os.path.exists(path):
        return None
    counts = {}
    for line in open(path):
        parts = line.strip().split(",")
        if len(parts) > 2 and parts[0].isdigit():
            counts[parts[2]] = int(parts[0])
    return counts or None


results = []
for sid, label, scen, tool, pids, url, extra in scenarios:
    row = {"id": sid, "label": label, "scenario": scen, "tool": tool, "proxies": len(pids.split())}
    for load in ("fixed", "max"):
        base = os.path.join(raw, f"{sid}.{load}")
        try:
            meta = json.load(open(base + ".meta"))
            r = PARSERS[tool](base, env)
        except Exception as e:  # keep going: one failed scenario must not hide the others
            row[load] = {"error": f"{type(e).__name__}: {e}"}
            continue
        cpu_s = meta["cpu_ticks"] / meta["clk_tck"]
        r["proxy_cpu_s"] = cpu_s
        r["cpu_s_per_10k"] = (cpu_s / r["ok"] * 10000) if r["ok"] and row["proxies"] else None
        r["peak_rss_mb"] = [round(k / 1024.0, 1) for k in meta["hwm_kb"]]
        r["wall_s"] = meta["wall"]
        r["load1"] = meta["load1"]
        r["rate"] = meta.get("rate", env["rate"])
        counts = read_counts(base + ".stat")
        if counts:
            r["counts"] = counts
        row[load] = r
    results.append(row)

by_id = {r["id"]: r for r in results}


# The direct row each scenario's *added* figures subtract.
BASELINE = {
    "d": "direct-h2", "e": "direct-grpc", "f": "direct-grpc-unary", "g": "direct-grpc-stream",
    "h": "direct-churn", "i": "direct-churn-tls",
}


def added(row, key):
    base_id = BASELINE.get(row["scenario"], "direct")
    b = by_id.get(base_id, {}).get("fixed", {})
    v = row.get("fixed", {})
    if row["id"] == base_id or v.get(key) is None or b.get(key) is None:
        return None
    return v[key] - b[key]


for r in results:
    r["added_ms"] = {k: added(r, k + "_ms") for k in ("p50", "p90", "p99", "p99_9")}


def f(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def rss(v):
    return "–" if not v else " / ".join(f"{x:.1f}" for x in v)


lines = []
lines.append(f"# Trellis benchmark, {env['date']} ({env['mode']})")
lines.append("")
lines.append(
    f"Loopback, {env['nproc']} cores ({env['cpu']}), kernel {env['kernel']}; Trellis {env['trellis_commit']} ({env.get('trellis_build', 'release')} build, proxy --workers: {env.get('proxy_workers', 'n/a')}, --peer-http1: {env.get('peer_http1', 'default')}, runtime threads: {env.get('proxy_threads', 'cores')}, proxies: {env.get('proxy_binary', 'trellis proxy')}), "
    f"HAProxy {env['haproxy']}, nginx {env['nginx']}, {env['oha']}, {env['h2load']}"
    f"{', ghz ' + env['ghz'] if env.get('ghz') else ''}. "
    f"Fixed rate: {env['rate']} rps over {env['fixed_conns']} connections"
    f" (oha --latency-correction; h2load --rps, no correction), {env['duration_s']} s; "
    f"max: {env['max_conns']} connections, {env['duration_s']} s. Backend: nginx, 1 KB body, same for all. "
    f"Load average at start {env['load_start']}, at end {env['load_end']} (other jobs may share the machine; "
    f"client, proxies and backend share the same {env['nproc']} cores)."
)
lines.append("")
lines.append("Latency in ms at the fixed rate; *added* = minus the direct row of the same scenario (d: direct h2c, e: direct gRPC-like, "
             "f/g: direct gRPC, h/i: direct with a new connection per request). gRPC rows (f, g; ghz --async at the fixed rate) "
             "count calls, a streaming call lasting until its last message; churn rows (h, i) open a new client connection per request; "
             "TLS churn (i) runs at a fifth of the fixed rate (three TLS handshakes per request on the mesh paths). "
             "CPU = user+system seconds of the proxy processes (both, for two-proxy rows) per 10k requests. "
             "RSS = peak (VmHWM) per proxy process in MB, reset before each run.")
lines.append("")
lines.append("| scen. | path | p50 | p90 | p99 | p99.9 | added p50 | added p90 | added p99 | rps @fixed | max rps | CPU s/10k @fixed | CPU s/10k @max | peak RSS @fixed | peak RSS @max | errors |")
lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in results:
    fx, mx = r.get("fixed", {}), r.get("max", {})
    if "error" in fx or "error" in mx:
        lines.append(f"| {r['scenario']} | {r['label']} | failed: {fx.get('error') or mx.get('error')} |" + " |" * 14)
        continue
    lines.append(
        f"| {r['scenario']} | {r['label']} | {f(fx.get('p50_ms'))} | {f(fx.get('p90_ms'))} | {f(fx.get('p99_ms'))} | "
        f"{f(fx.get('p99_9_ms'))} | {f(r['added_ms']['p50'])} | {f(r['added_ms']['p90'])} | {f(r['added_ms']['p99'])} | {f(fx.get('rps'), 0)} | "
        f"{f(mx.get('rps'), 0)} | {f(fx.get('cpu_s_per_10k'), 2)} | {f(mx.get('cpu_s_per_10k'), 2)} | "
        f"{rss(fx.get('peak_rss_mb'))} | {rss(mx.get('peak_rss_mb'))} | {(fx.get('errors') or 0) + (mx.get('errors') or 0)} |"
    )

# targets of issue 13 (the data-path ones; bench/scale reports the control plane's)
def g(i, load, key):
    return by_id.get(i, {}).get(load, {}).get(key)


targets = []
tm = by_id.get("trellis-mesh", {}).get("added_ms", {}).get("p99")
hm = by_id.get("haproxy-mesh", {}).get("added_ms", {}).get("p99")
if tm is not None and hm is not None:
    targets.append(("mesh p99 added at 1k rps <= HAProxy's", f"{tm:.3f} ms vs {hm:.3f} ms", tm <= hm))
    targets.append(("mesh p99 added at 1k rps <= 0.3 ms", f"{tm:.3f} ms", tm <= 0.3))
tmax, hmax = g("trellis-mesh", "max", "rps"), g("haproxy-mesh", "max", "rps")
if tmax and hmax:
    targets.append(("mesh max throughput >= HAProxy's", f"{tmax:.0f} vs {hmax:.0f} rps ({tmax / hmax:.2f}x)", tmax >= hmax))
t1, h1 = g("trellis-1hop", "max", "rps"), g("haproxy-1hop", "max", "rps")
if t1 and h1:
    targets.append(("one hop max throughput >= 0.8x HAProxy's", f"{t1:.0f} vs {h1:.0f} rps ({t1 / h1:.2f}x)", t1 >= 0.8 * h1))
idle = max(env["idle_rss_kb"].values()) / 1024.0
targets.append(("proxy RSS idle <= 15 MB", f"{idle:.1f} MB (largest idle proxy, after start and one request)", idle <= 15))
r1k = g("trellis-mesh", "fixed", "peak_rss_mb")
if r1k:
    targets.append(("proxy RSS at 1k rps <= 25 MB", f"{max(r1k):.1f} MB (peak of the two mesh proxies)", max(r1k) <= 25))
gu = by_id.get("trellis-mesh-grpc-unary", {}).get("added_ms", {}).get("p99")
if gu is not None:
    hu = by_id.get("haproxy-mesh-grpc-unary", {}).get("added_ms", {}).get("p99")
    fl = by_id.get("relays-grpc-unary", {}).get("added_ms", {}).get("p99")
    beside = [f"{name}: {v:.3f} ms" for name, v in (("HAProxy mesh", hu), ("two plain TCP relays", fl)) if v is not None]
    vs = f" ({', '.join(beside)})" if beside else ""
    rate = g("trellis-mesh-grpc-unary", "fixed", "rate")
    at = "" if rate == 1000 else f"; measured at {rate} calls/s, not 1,000"
    targets.append(("gRPC unary through the mesh: p99 added <= 0.5 ms at 1,000 calls/s",
                    f"{gu:.3f} ms{vs}{at}", gu <= 0.5 and rate == 1000))

def per_request(r, load):
    """(syscalls, context switches) per request of a row's proxies in one load, or None."""
    v = r.get(load, {})
    c, n = v.get("counts"), v.get("ok")
    if not c or not n:
        return None
    sc, cs = c.get("raw_syscalls:sys_enter"), c.get("context-switches")
    return (sc / n if sc is not None else None, cs / n if cs is not None else None)


counted = [r for r in results if per_request(r, "fixed") or per_request(r, "max")]
if counted:
    lines.append("")
    lines.append("System calls and context switches of the proxies (all of a row's proxy processes) per request "
                 "during the fixed-rate and the max runs (`bench/run --counts`, perf stat):")
    lines.append("")
    lines.append("| path | syscalls / request @fixed | context switches / request @fixed "
                 "| syscalls / request @max | context switches / request @max |")
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for r in counted:
        cells = []
        for load in ("fixed", "max"):
            pr = per_request(r, load) or (None, None)
            cells += [f(x, 2) if x is not None else "–" for x in pr]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")

lines.append("")
lines.append("## Targets (issue 13)")
lines.append("")
lines.append("| target | measured | |")
lines.append("| --- | --- | --- |")
for name, meas, ok in targets:
    lines.append(f"| {name} | {meas} | {'met' if ok else '**not met**'} |")
lines.append("| proxy RSS flat from 10 to 1,000 services; config to 2,000 proxies <= 1 s; a route change seen by 6 proxies <= 5 ms of control-plane CPU | measured by `bench/scale` (`<date>-scale.md`) | see there |")
md = "\n".join(lines) + "\n"
open(out + ".md", "w").write(md)
json.dump({"env": env, "results": results, "targets": [{"target": n, "measured": m, "met": o} for n, m, o in targets]},
          open(out + ".json", "w"), indent=2)
print(md)
