#!/usr/bin/env python3
"""dnsq.py SERVER NAME: asks SERVER (port 53, UDP) for NAME's A records and
prints them, one a line. Exit 0 with an answer, 1 when the server answered
without one (rcode and name printed), 2 when it did not answer within 1 s.

scripts/k8s-cluster uses it to wait for the cluster DNS, so that it needs
neither dig nor a resolver configured for the cluster on the host."""
import random
import socket
import struct
import sys


def query(server, name):
    qid = random.randrange(1 << 16)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(packet, (server, 53))
        while True:
            data, _ = s.recvfrom(4096)
            if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid:
                break
    _, flags, qd, an, _, _ = struct.unpack(">HHHHHH", data[:12])
    pos = 12
    for _ in range(qd):
        pos = skip_name(data, pos) + 4
    addrs = []
    for _ in range(an):
        pos = skip_name(data, pos)
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[pos:pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(data[pos:pos + 4]))
        pos += rdlen
    return flags & 0xF, addrs


def skip_name(data, pos):
    while True:
        n = data[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:
            return pos + 2
        pos += n + 1


def main():
    if len(sys.argv) != 3:
        print("usage: dnsq.py SERVER NAME", file=sys.stderr)
        return 64
    try:
        rcode, addrs = query(sys.argv[1], sys.argv[2])
    except (socket.timeout, OSError) as e:
        print(f"no answer from {sys.argv[1]}: {e}", file=sys.stderr)
        return 2
    if not addrs:
        print(f"{sys.argv[2]}: no A record (rcode {rcode})", file=sys.stderr)
        return 1
    print("\n".join(addrs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
