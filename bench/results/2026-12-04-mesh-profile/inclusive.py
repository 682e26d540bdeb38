import sys, re, collections
# inclusive share of samples whose stack contains a frame matching each pattern
pats = [(n, re.compile(p)) for n, p in [
 ("syscalls (kernel entry)", r"entry_SYSCALL"),
 ("kernel any", r"\[unknown\]|^ffffffff"),
 ("h1 server read head (parse)", r"poll_read_head"),
 ("h1 server write (encode+flush)", r"Dispatcher<.*>::poll_write|poll_flush"),
 ("hyper h1 encode", r"Http1Transaction>::encode"),
 ("hyper h1 parse", r"Http1Transaction>::parse"),
 ("trellis outbound::handle", r"trellis_proxy::outbound::handle"),
 ("trellis inbound::handle", r"trellis_proxy::inbound::handle"),
 ("traffic::forward", r"trellis_proxy::traffic::forward"),
 ("peer_h2", r"trellis_proxy::peer_h2"),
 ("h2 client Connection poll", r"h2::client::Connection<.*> as core::future::future::Future>::poll"),
 ("h2 server Connection", r"h2::server::Connection"),
 ("hyper h2 server", r"hyper::proto::h2::server"),
 ("h1pool", r"trellis_proxy::h1pool"),
 ("rustls any", r"rustls::"),
 ("tokio_rustls", r"tokio_rustls::"),
 ("ring aes", r"aes_gcm|ring_core"),
 ("mimalloc", r"mi_|_mi_"),
 ("memcpy/memmove", r"memmove|memcpy"),
 ("telemetry/metrics", r"trellis_proxy::(telemetry|metrics|series|accesslog|trace)"),
 ("route", r"trellis_proxy::route"),
 ("balance", r"trellis_proxy::balance"),
 ("tokio scheduler", r"tokio::runtime::scheduler"),
 ("tokio io driver", r"tokio::runtime::io|mio::"),
 ("tokio time", r"tokio::runtime::time|tokio::time"),
 ("epoll_wait", r"epoll_wait"),
 ("HeaderMap", r"http::header::map"),
 ("hpack", r"h2::hpack"),
 ("drop_in_place", r"drop_in_place"),
]]
samples = []
cur = []
for line in open(sys.argv[1], errors="replace"):
    if not line.strip():
        if cur: samples.append(cur); cur = []
        continue
    if not line.startswith(("\t", " ")):
        if cur: samples.append(cur)
        cur = []
        continue
    parts = line.strip().split(" ", 1)
    if len(parts) == 2: cur.append(parts[1])
    elif parts: cur.append(parts[0])
if cur: samples.append(cur)
n = len(samples)
print(f"{n} samples")
for name, p in pats:
    c = sum(1 for s in samples if any(p.search(f) for f in s))
    print(f"{100*c/n:6.1f}%  {name}")
