#!/usr/bin/python3
"""A tiny authoritative DNS server over UDP for the end-to-end tests.

Answers A queries from a JSON file {"name": ["127.0.0.1", ...]} read again
for every query, so a test changes a record by rewriting the file. AAAA
and other types of a known name get an empty NOERROR answer; unknown names
NXDOMAIN. TTL 1. Every query is appended to --log (one "name type" line).
Options: --port P (required), --records FILE (required), --log FILE.
"""
import argparse
import json
import socket
import struct


def parse_name(data, off):
    labels = []
    while True:
        n = data[off]
        off += 1
        if n == 0:
            return ".".join(labels), off
        labels.append(data[off:off + n].decode("ascii", "replace"))
        off += n


def answer(data, records):
    qid, flags, qd = struct.unpack("!HHH", data[:6])
    name, off = parse_name(data, 12)
    qtype, qclass = struct.unpack("!HH", data[off:off + 4])
    question = data[12:off + 4]
    ips = records.get(name.lower().rstrip("."))
    rcode = 3 if ips is None else 0
    answers = b""
    count = 0
    if ips and qtype == 1:
        for ip in ips:
            answers += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 1, 4) + socket.inet_aton(ip)
            count += 1
    head = struct.pack("!HHHHHH", qid, 0x8400 | (flags & 0x0100) | rcode, 1, count, 0, 0)
    return head + question + answers, name, qtype


def main():
    p = argparse.ArgumentParser(description="test DNS server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--records", required=True)
    p.add_argument("--log")
    opts = p.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", opts.port))
    while True:
        data, addr = sock.recvfrom(4096)
        try:
            with open(opts.records) as f:
                records = {k.lower(): v for k, v in json.load(f).items()}
            out, name, qtype = answer(data, records)
        except (ValueError, IndexError, OSError, struct.error):
            continue
        if opts.log:
            with open(opts.log, "a") as f:
                f.write("%s %d\n" % (name, qtype))
        sock.sendto(out, addr)


if __name__ == "__main__":
    main()
