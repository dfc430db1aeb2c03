#!/usr/bin/env python3
"""Memory per idle client connection: bascule beside NGINX and HAProxy, in one run.

Each balancer in turn sits in front of the same backends (from compare.py); this script opens N
client connections to it, sends one keep-alive request on each, reads the reply, and leaves them
idle. The balancer's RSS before and after gives kilobytes per idle connection.

  python3 bench/idle_memory.py                 # 4000 connections, all three balancers
  python3 bench/idle_memory.py --conns 8000 --only bascule
Needs what compare.py needs. Open files are limited to 20000 here: keep --conns under ~9000.
"""
import argparse
import os
import resource
import selectors
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def open_idle(port, n):
    socks, sel = [], selectors.DefaultSelector()
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(req)
        socks.append(s)
        if i % 500 == 499:
            time.sleep(0.05)
    answered = 0
    for s in socks:
        s.settimeout(5)
        try:
            if s.recv(4096).startswith(b"HTTP/1.1 200"):
                answered += 1
        except OSError:
            pass
    return socks, answered


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="bascule,nginx,haproxy")
    ap.add_argument("--conns", type=int, default=4000)
    ap.add_argument("--bascule-cmd", default="target/release/bascule --config {config}")
    ap.add_argument("--bascule-config")
    ap.add_argument("--pingora-bin", default="")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    d = tempfile.mkdtemp(prefix="lbidle-")
    os.chmod(d, 0o755)
    open(f"{d}/big.bin", "wb").write(b"x")
    open(f"{d}/backends.conf", "w").write(compare.backends_conf(d))
    backends = compare.Proc(["nginx", "-p", d, "-c", f"{d}/backends.conf"], f"{d}/backends.log")
    ok = True
    try:
        compare.wait_until(lambda: all(compare.port_open(p) for p in compare.BACKEND_PORTS))
        print("| balancer | connections answered | RSS before MB | RSS after MB | KiB per idle connection |")
        print("|---|---:|---:|---:|---:|")
        for name in [n.strip() for n in args.only.split(",") if n.strip()]:
            proc = compare.Proc(compare.balancer_argv(name, d, args, False), f"{d}/{name}.log")
            try:
                if not compare.wait_until(lambda: compare.port_open(compare.PLAIN_PORT)):
                    print(f"| {name} | did not start | | | |")
                    ok = False
                    continue
                warm, _ = open_idle(compare.PLAIN_PORT, 50)  # pools and lazy start-up allocations
                for s in warm:
                    s.close()
                time.sleep(0.5)
                before = proc.rss_mb()
                socks, answered = open_idle(compare.PLAIN_PORT, args.conns)
                time.sleep(1.0)
                after = proc.rss_mb()
                per = (after - before) * 1024 / max(answered, 1)
                print(f"| {name} | {answered} | {before:.1f} | {after:.1f} | {per:.1f} |", flush=True)
                ok &= answered == args.conns
                for s in socks:
                    s.close()
            finally:
                proc.stop()
                compare.wait_until(lambda: not compare.port_open(compare.PLAIN_PORT))
    finally:
        backends.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
