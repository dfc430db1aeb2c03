#!/usr/bin/env python3
"""Reproduces the README's profiling figures that compare.py does not give.

  instructions LOAD   user-space instructions per request under callgrind, LOAD one of
                      keepalive, close, tls (HTTP/1 over TLS), h2 (HTTP/2 over TLS),
                      handshake (a new TLS connection per request, as wrk resumes them) or
                      cached (a 4 KiB reply from the memory tier of the edge cache) or
                      redis-hit (4 KiB replies from the Redis tier: 20 000 URLs through a
                      1 MiB memory tier, so nearly every request misses in memory; needs
                      redis-server, run on core 1 at port 19379)
  cpu-split           user and system CPU per request, bascule and NGINX alternately
                      (add --close for a new connection per request)
  idle-tls            RSS per idle TLS keep-alive connection
  reuse               new backend connections per 1 000 requests, keep-alive clients and
                      clients opening a connection per request (from /metrics)

--max-connections N gives bascule's upstream that per-backend limit: high, to see what the limit
costs a request that never waits; 1, for 64 clients on three backends, to see what a request
that waits in the queue and is handed its place costs.

Run from the project root after `cargo build --release`. Needs nginx-light, wrk, nghttp2-client
(h2load), valgrind and openssl (Debian packages), and redis-server for redis-hit. The balancer
runs on core 0; the three NGINX backends, Redis and the load on core 1, as in compare.py. Ports
18080 to 18082, 18443, 19001-19003 and 19379 must be free.
"""
import argparse
import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

BASCULE = os.path.abspath("target/release/bascule")
PLAIN, NGINX_LB, ADMIN, TLS = 18080, 18081, 18082, 18443
BACKENDS = (19001, 19002, 19003)
REDIS = 19379
SHARED_URLS = 20000


def nginx_head(d, name):
    return (f"daemon off;\nmaster_process on;\nworker_processes 1;\n"
            f"error_log {d}/{name}.err warn;\npid {d}/{name}.pid;\n"
            f"events {{ worker_connections 16384; }}\n")


def write_configs(d, max_connections=None, redis=False):
    with open(f"{d}/cached.bin", "wb") as f:
        f.write(b"c" * 4096)
    servers = "".join(f"""
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{ add_header X-Backend {i}; return 200 "backend {i}\\n"; }}
    location = /cached {{ alias {d}/cached.bin; add_header Cache-Control "public, max-age=600"; }}
    location /shared {{ alias {d}/cached.bin; add_header Cache-Control "public, max-age=600"; }}
  }}""" for i, port in enumerate(BACKENDS, 1))
    open(f"{d}/backends.conf", "w").write(nginx_head(d, "backends") + f"""http {{
  access_log off;
  default_type text/plain;
  client_body_temp_path {d}/backends-body;
{servers}
}}
""")
    upstream = "".join(f"    server 127.0.0.1:{p};\n" for p in BACKENDS)
    open(f"{d}/nginx-lb.conf", "w").write(nginx_head(d, "nginx-lb") + f"""http {{
  access_log off;
  client_body_temp_path {d}/lb-body;
  proxy_temp_path {d}/lb-proxy;
  upstream app {{
{upstream}    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{NGINX_LB} backlog=4096;
    keepalive_requests 1000000;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem", "-days", "2",
                    "-subj", "/CN=localhost"], check=True, capture_output=True)
    backends = "".join(f"      - 127.0.0.1:{p}\n" for p in BACKENDS)
    limit = f"    max_connections: {max_connections}\n" if max_connections else ""
    shared_cache = f"""  shared:
    memory: 1MiB
    max_object: 64KiB
    redis:
      url: redis://127.0.0.1:{REDIS}/0
""" if redis else ""
    shared_route = """      - match: { path_prefix: /shared }
        upstream: app
        cache: shared
""" if redis else ""
    open(f"{d}/bascule.yaml", "w").write(f"""admin:
  bind: 127.0.0.1:{ADMIN}
caches:
  pages:
    memory: 256MiB
{shared_cache}listeners:
  - bind: 127.0.0.1:{PLAIN}
    routes:
      - match: {{ path_prefix: /cached }}
        upstream: app
        cache: pages
{shared_route}      - upstream: app
  - bind: 127.0.0.1:{TLS}
    tls:
      certificates:
        - cert: {d}/cert.pem
          key: {d}/key.pem
    routes:
      - upstream: app
upstreams:
  app:
    balance: round_robin
{limit}    backends:
{backends}""")


def start(cmd, cpu):
    return subprocess.Popen(["taskset", "-c", str(cpu)] + cmd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(url):
    ctx = ssl._create_unverified_context()
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1, context=ctx).read()
            return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"nothing answered at {url}")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime


def wrk(url, seconds, close):
    cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", url]
    if close:
        cmd[-1:-1] = ["-H", "Connection: close"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))


def callgrind_total(path):
    out = subprocess.run(["callgrind_annotate", path], capture_output=True, text=True).stdout
    return int(re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", out).group(1).replace(",", ""))


def instructions(d, load, n):
    # Outside the temporary directory, so that it stays for callgrind_annotate.
    out = f"/tmp/bascule-callgrind-{load}.out"
    for old in (out, f"{out}.1"):
        if os.path.exists(old):
            os.remove(old)
    vg = start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no",
                BASCULE, "-c", f"{d}/bascule.yaml"], 0)
    url = f"https://127.0.0.1:{TLS}/" if load in ("tls", "h2", "handshake") else f"http://127.0.0.1:{PLAIN}/"
    if load == "cached":
        url += "cached"
    wait_for(url)
    h2load = {"keepalive": ["h2load", "--h1", "-c", "16"], "tls": ["h2load", "--h1", "-c", "16"],
              "cached": ["h2load", "--h1", "-c", "16"],
              "h2": ["h2load", "-c", "16", "-m", "10"]}
    if load == "redis-hit":
        # Each URL comes back once in 20 000 requests (the step is prime to
        # their number): the 1 MiB memory tier holds about 200 of them.
        with open(f"{d}/urls.lua", "w") as f:
            f.write(f"""local i = 0
request = function()
  i = (i + 7919) % {SHARED_URLS}
  return wrk.format("GET", "/shared?k=" .. i)
end
""")

    def run_load(count):
        if load == "redis-hit":
            # About what callgrind lets through in a second.
            cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{max(1, count // 1500)}s",
                   "-s", f"{d}/urls.lua", url]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            return int(re.search(r"(\d+) requests in", out).group(1))
        if load in ("close", "handshake"):
            seconds = max(1, count // 1000)
            return wrk(url, seconds, True)
        subprocess.run(["taskset", "-c", "1"] + h2load[load] + ["-n", str(count), url],
                       check=True, capture_output=True)
        return count

    # Warm-up: pools filled, nothing lazy left; for redis-hit, every URL stored in Redis.
    run_load(2 * SHARED_URLS if load == "redis-hit" else 2000)
    subprocess.run(["callgrind_control", "-i", "on", str(vg.pid)], check=True, capture_output=True)
    sent = run_load(n)
    subprocess.run(["callgrind_control", "-i", "off", str(vg.pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-d", str(vg.pid)], check=True, capture_output=True)
    if load == "redis-hit":
        # What the requests found, warm-up included.
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics").read().decode()
        found = re.findall(r'cache="shared",result="(\w+)"\} (\d+)', metrics)
        print("shared cache: " + ", ".join(f"{k} {v}" for k, v in found))
    vg.send_signal(signal.SIGTERM)
    vg.wait()
    total = callgrind_total(f"{out}.1")
    print(f"{load}: {total / sent:.0f} instructions per request ({sent} requests; "
          f"callgrind_annotate {out}.1 for the breakdown)")


def cpu_split(d, close, rounds, seconds):
    lb = start([BASCULE, "-c", f"{d}/bascule.yaml"], 0)
    ngx = start(["nginx", "-p", d, "-c", f"{d}/nginx-lb.conf"], 0)
    try:
        wait_for(f"http://127.0.0.1:{PLAIN}/")
        wait_for(f"http://127.0.0.1:{NGINX_LB}/")
        workers = subprocess.run(["pgrep", "-P", str(ngx.pid)], capture_output=True,
                                 text=True).stdout.split()
        peers = [("bascule", lb.pid, PLAIN), ("nginx", int(workers[0]), NGINX_LB)]
        for r in range(1, rounds + 1):
            for name, pid, port in peers:
                u0, s0 = cpu_seconds(pid)
                n = wrk(f"http://127.0.0.1:{port}/", seconds, close)
                u1, s1 = cpu_seconds(pid)
                print(f"round {r} {name:8} {n / seconds:8.0f} rps  user {(u1 - u0) * 1e6 / n:5.1f} us/req"
                      f"  system {(s1 - s0) * 1e6 / n:5.1f} us/req")
    finally:
        lb.terminate()
        ngx.terminate()
        lb.wait()
        ngx.wait()


def connections_opened():
    text = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("bascule_backend_connections_opened_total"))


def reuse(d, seconds):
    lb = start([BASCULE, "-c", f"{d}/bascule.yaml"], 0)
    try:
        wait_for(f"http://127.0.0.1:{PLAIN}/")
        for load, close in (("keepalive", False), ("close", True)):
            before = connections_opened()
            n = wrk(f"http://127.0.0.1:{PLAIN}/", seconds, close)
            opened = connections_opened() - before
            print(f"{load}: {opened:.0f} new backend connections in {n} requests "
                  f"({opened * 1000 / n:.2f} per 1 000)")
    finally:
        lb.terminate()
        lb.wait()


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])


async def idle_tls(d, conns):
    lb = start([BASCULE, "-c", f"{d}/bascule.yaml"], 0)
    try:
        wait_for(f"https://127.0.0.1:{TLS}/")
        ctx = ssl._create_unverified_context()
        ctx.set_alpn_protocols(["http/1.1"])

        async def one(keep):
            r, w = await asyncio.open_connection("127.0.0.1", TLS, ssl=ctx, server_hostname="localhost")
            w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await r.readexactly(length)
            keep.append(w)

        await one([])
        time.sleep(1.5)
        before = rss_kib(lb.pid)
        keep = []
        for _ in range(0, conns, 200):
            await asyncio.gather(*[one(keep) for _ in range(200)])
        time.sleep(2.5)  # freed pages go back to the system after 100 ms
        after = rss_kib(lb.pid)
        print(f"{len(keep)} idle TLS connections: RSS {before} -> {after} KiB, "
              f"{(after - before) / len(keep):.1f} KiB each")
    finally:
        lb.kill()
        lb.wait()


class Both:
    """Two processes stopped as one."""

    def __init__(self, a, b):
        self.procs = (a, b)

    def terminate(self):
        for p in self.procs:
            p.terminate()

    def wait(self):
        for p in self.procs:
            p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-connections", type=int, help="bascule's per-backend limit")
    sub = ap.add_subparsers(dest="what", required=True)
    ins = sub.add_parser("instructions")
    ins.add_argument("load", choices=["keepalive", "close", "tls", "h2", "handshake", "cached", "redis-hit"])
    ins.add_argument("--requests", type=int, default=20000,
                     help="requests measured (close: a thousand per second of wrk)")
    split = sub.add_parser("cpu-split")
    split.add_argument("--close", action="store_true")
    split.add_argument("--rounds", type=int, default=3)
    split.add_argument("--seconds", type=int, default=8)
    idle = sub.add_parser("idle-tls")
    idle.add_argument("--conns", type=int, default=3000)
    sub.add_parser("reuse").add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if not os.path.exists(BASCULE):
        sys.exit("build first: cargo build --release")

    with tempfile.TemporaryDirectory(prefix="bascule-profile-") as d:
        os.chmod(d, 0o755)
        redis = args.what == "instructions" and args.load == "redis-hit"
        write_configs(d, args.max_connections, redis)
        backends = start(["nginx", "-p", d, "-c", f"{d}/backends.conf"], 1)
        if redis:
            backends = Both(backends, start(["redis-server", "--port", str(REDIS), "--save", "",
                                             "--appendonly", "no"], 1))
        try:
            if args.what == "instructions":
                instructions(d, args.load, args.requests)
            elif args.what == "cpu-split":
                cpu_split(d, args.close, args.rounds, args.seconds)
            elif args.what == "reuse":
                reuse(d, args.seconds)
            else:
                asyncio.run(idle_tls(d, args.conns))
        finally:
            backends.terminate()
            backends.wait()


if __name__ == "__main__":
    main()
