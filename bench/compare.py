#!/usr/bin/env python3
"""Side-by-side load comparison: bascule against NGINX, HAProxy and Pingora, on this machine, in one run.

The same three backend replicas (one NGINX process serving fixed replies on three
ports) sit behind each balancer in turn; the same load hits each one; rounds rotate
the order so machine drift hits every balancer alike.  With two or more cores the
balancer under test is pinned to one core and the load generator plus backends to
another, so every balancer gets exactly one core: the figures compare single-core
efficiency.

Figures per balancer and scenario (median over rounds):
  rps        requests per second at saturation (closed loop)
  p50/p99    latency under that load (h2load reports mean and max instead)
  cpu_us     CPU time the balancer's processes spent per request (user+sys), microseconds
  rss_mb     resident memory of the balancer after the run
  errors     socket errors + non-2xx replies seen by the load generator

Scenarios:
  keepalive  small reply, persistent client connections (wrk)
  close      small reply, a new client connection per request (wrk)
  big        64 KiB reply, persistent connections (wrk)
  tls        small reply over TLS, persistent connections (wrk)
  handshake  small reply over TLS, a new connection and TLS handshake per request (wrk)
             (every balancer offers TLS 1.2 and 1.3, the defaults of current NGINX and HAProxy)
  h2         HTTP/2 over TLS (ALPN), 64 connections x 10 streams (h2load)
  cached     4 KiB reply with Cache-Control: public, max-age=600, served from each balancer's cache
             (NGINX proxy_cache, HAProxy's cache, bascule's `caches`); Pingora's peer build sits it out
The TLS scenarios need bascule's `tls` listener key; Pingora's peer build has no TLS and sits them out.

Needs: nginx, haproxy, wrk, openssl, and h2load for h2
  (Debian: apt-get install -y nginx-light haproxy wrk nghttp2-client openssl).
Optional peer: a round-robin balancer built on Cloudflare's Pingora, given with --pingora-bin
  (it takes its listen address and backend addresses as arguments) and named in --only.
Run from the project root after `cargo build --release`:
  python3 bench/compare.py                                  # bascule, NGINX and HAProxy, default scenarios
  python3 bench/compare.py --only bascule,haproxy --scenarios keepalive --rounds 1
Exit status: 0 when every run produced figures, 1 when a balancer failed to start or serve.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

BACKEND_PORTS = [19001, 19002, 19003]
PLAIN_PORT = 18080
TLS_PORT = 18443
ADMIN_PORT = 19901
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEERS = ("nginx", "haproxy", "pingora")


class Scenario:
    def __init__(self, name, about, path="/", tls=False, close=False, tool="wrk"):
        self.name, self.about, self.path, self.tls, self.close, self.tool = name, about, path, tls, close, tool

    def url(self, port):
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}{self.path}"


SCENARIOS = {s.name: s for s in [
    Scenario("keepalive", "small reply, persistent client connections"),
    Scenario("close", "small reply, a new client connection per request", close=True),
    Scenario("big", "64 KiB reply, persistent client connections", path="/big"),
    Scenario("tls", "small reply over TLS, persistent client connections", tls=True),
    Scenario("handshake", "small reply over TLS, a new connection and TLS handshake per request (the client resumes)",
             tls=True, close=True),
    Scenario("h2", "HTTP/2 over TLS, 64 connections x 10 concurrent streams (h2load)", tls=True, tool="h2load"),
    Scenario("cached", "4 KiB reply the backends mark cacheable, served from each balancer's cache", path="/cached"),
]}


# ---- processes -------------------------------------------------------------------------------

def cores():
    cpus = sorted(os.sched_getaffinity(0))
    return (str(cpus[0]), str(cpus[1])) if len(cpus) >= 2 else (None, None)


def pinned(cpu, argv):
    return (["taskset", "-c", cpu] + argv) if cpu is not None else argv


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class Proc:
    """A process started in its own session, so its whole group can be measured and stopped."""

    def __init__(self, argv, log_path, stop_signal=signal.SIGTERM):
        self.stop_signal = stop_signal
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)

    def _group(self):
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == self.p.pid:  # pgrp
                    yield int(d), fields
            except (OSError, IndexError, ValueError):
                pass

    def cpu_seconds(self):
        return sum(int(f[11]) + int(f[12]) for _, f in self._group()) / CLK_TCK  # utime + stime

    def rss_mb(self):
        total = 0
        for pid, _ in self._group():
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += sum(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            except OSError:
                pass
        return total / 1024

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, self.stop_signal)
                self.p.wait(timeout=5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()


# ---- configurations --------------------------------------------------------------------------

def nginx_head(d, name):
    return f"""daemon off;
master_process on;
worker_processes 1;
error_log {d}/{name}.err warn;
pid {d}/{name}.pid;
events {{ worker_connections 16384; }}
"""


def backends_conf(d):
    servers = "".join(f"""
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location = /healthz {{ return 200 "ok\\n"; }}
    location = /big {{ alias {d}/big.bin; }}
    location = /cached {{ alias {d}/cached.bin; add_header Cache-Control "public, max-age=600"; }}
    location / {{ add_header X-Backend {i}; return 200 "backend {i}\\n"; }}
  }}""" for i, port in enumerate(BACKEND_PORTS, 1))
    return nginx_head(d, "backends") + f"""http {{
  access_log off;
  default_type text/plain;
  client_body_temp_path {d}/backends-body;
{servers}
}}
"""


def nginx_lb_conf(d, tls, cached=False):
    upstream = "".join(f"    server 127.0.0.1:{p};\n" for p in BACKEND_PORTS)
    proxy = """    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }"""
    if cached:
        proxy += """
    location = /cached {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache pages;
    }"""
    cache_zone = f"  proxy_cache_path {d}/nginx-cache keys_zone=pages:10m max_size=256m;\n" if cached else ""
    tls_server = f"""
  server {{
    listen 127.0.0.1:{TLS_PORT} ssl http2 backlog=4096;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 1000000;
{proxy}
  }}""" if tls else ""
    return nginx_head(d, "nginx-lb") + f"""http {{
  access_log off;
  client_body_temp_path {d}/nginx-lb-body;
  proxy_temp_path {d}/nginx-lb-proxy;
{cache_zone}  upstream app {{
{upstream}    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{PLAIN_PORT} backlog=4096;
    keepalive_requests 1000000;
{proxy}
  }}{tls_server}
}}
"""


def haproxy_conf(d, tls, cached=False):
    servers = "".join(f"  server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(BACKEND_PORTS, 1))
    tls_bind = f"  bind 127.0.0.1:{TLS_PORT} ssl crt {d}/combined.pem alpn h2,http/1.1\n" if tls else ""
    cache_rules = "  http-request cache-use pages\n  http-response cache-store pages\n" if cached else ""
    cache_section = "cache pages\n  total-max-size 256\n  max-object-size 1048576\n  max-age 600\n" if cached else ""
    return f"""global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{PLAIN_PORT}
{tls_bind}  default_backend app
backend app
  balance roundrobin
{cache_rules}{servers}{cache_section}"""


def bascule_conf(d, tls, cached=False):
    backends = "\n".join(f"      - 127.0.0.1:{p}" for p in BACKEND_PORTS)
    tls_listener = f"""  - bind: 127.0.0.1:{TLS_PORT}
    tls:
      certificates:
        - cert: {d}/cert.pem
          key: {d}/key.pem
    routes:
      - upstream: app
""" if tls else ""
    cache_route = "      - match: { path_prefix: /cached }\n        upstream: app\n        cache: pages\n" if cached else ""
    caches = "caches:\n  pages:\n    memory: 256MiB\n" if cached else ""
    return f"""listeners:
  - bind: 127.0.0.1:{PLAIN_PORT}
    routes:
{cache_route}      - upstream: app
{tls_listener}{caches}upstreams:
  app:
    balance: round_robin
    backends:
{backends}
admin:
  bind: 127.0.0.1:{ADMIN_PORT}
"""


def make_cert(d):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    with open(f"{d}/combined.pem", "w") as out:
        out.write(open(f"{d}/cert.pem").read() + open(f"{d}/key.pem").read())
    for f in ("key.pem", "cert.pem", "combined.pem"):
        os.chmod(f"{d}/{f}", 0o644)


def balancer_argv(name, d, args, tls, cached=False):
    if name == "nginx":
        open(f"{d}/nginx-lb.conf", "w").write(nginx_lb_conf(d, tls, cached))
        return ["nginx", "-p", d, "-c", f"{d}/nginx-lb.conf"]
    if name == "haproxy":
        open(f"{d}/haproxy.cfg", "w").write(haproxy_conf(d, tls, cached))
        return ["haproxy", "-db", "-f", f"{d}/haproxy.cfg"]
    if name == "pingora":
        return [args.pingora_bin, f"127.0.0.1:{PLAIN_PORT}"] + [f"127.0.0.1:{p}" for p in BACKEND_PORTS]
    if name == "bascule":
        text = open(args.bascule_config).read() if args.bascule_config else bascule_conf(d, tls, cached)
        open(f"{d}/bascule.yaml", "w").write(text)
        return [a.replace("{config}", f"{d}/bascule.yaml") for a in args.bascule_cmd.split()]
    raise ValueError(name)


# ---- load --------------------------------------------------------------------------------------

UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    return float(m.group(1)) * UNIT[m.group(2)] if m else float("nan")


def run_wrk(cpu, url, conns, seconds, close):
    extra = ["-H", "Connection: close"] if close else []
    argv = pinned(cpu, ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s"] + extra + [url])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    fig = {"requests": 0, "rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": 0}
    if m := re.search(r"(\d+) requests in", out):
        fig["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        fig["rps"] = float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        if m := re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M):
            fig[key] = to_ms(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        # with Connection: close, wrk counts the server's orderly close as a read error: ignore reads there
        counted = [m.group(1), m.group(3), m.group(4)] + ([] if close else [m.group(2)])
        fig["errors"] += sum(int(c) for c in counted)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        fig["errors"] += int(m.group(1))
    return fig, out


def run_h2load(cpu, url, conns, seconds):
    argv = pinned(cpu, ["h2load", "-c", str(conns), "-m", "10", "-D", str(seconds), url])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    fig = {"requests": 0, "rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": 0}
    if m := re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out):
        fig["rps"] = float(m.group(1))
    if m := re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                      out):
        fig["requests"] = int(m.group(2))
        fig["errors"] = int(m.group(3)) + int(m.group(4))
    if m := re.search(r"status codes: (\d+) 2xx", out):
        fig["errors"] += fig["requests"] - int(m.group(1))
    if m := re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out):  # min max mean
        fig["p50"], fig["p99"] = to_ms(m.group(3)), to_ms(m.group(2))  # mean and max stand in
    return fig, out


def run_load(cpu, sc, port, conns, seconds):
    if sc.tool == "h2load":
        return run_h2load(cpu, sc.url(port), conns, seconds)
    return run_wrk(cpu, sc.url(port), conns, seconds, sc.close)


def smoke(url):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
            return r.status == 200 and r.read().startswith(b"backend")
    except Exception as e:  # noqa: BLE001 - any failure means the balancer does not serve
        print(f"  smoke request to {url} failed: {e}", file=sys.stderr)
        return False


# ---- main --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="bascule,nginx,haproxy",
                    help="comma list of: bascule, nginx, haproxy, pingora, direct (no balancer: the limit)")
    ap.add_argument("--scenarios", default="keepalive,close,big", help=f"comma list of {', '.join(SCENARIOS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--bascule-cmd", default="target/release/bascule --config {config}",
                    help="command that starts bascule; {config} becomes the generated YAML path")
    ap.add_argument("--bascule-config", help=f"use this YAML instead of the generated one (listen on "
                    f"127.0.0.1:{PLAIN_PORT}, TLS on {TLS_PORT}; backends on ports {BACKEND_PORTS})")
    ap.add_argument("--pingora-bin", default="", help="a Pingora-based peer's binary, for --only pingora")
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    scenarios = [SCENARIOS[s.strip()] for s in args.scenarios.split(",") if s.strip()]
    tls = any(sc.tls for sc in scenarios)
    cached = any(sc.name == "cached" for sc in scenarios)
    if "pingora" in names and not os.path.exists(args.pingora_bin):
        print(f"# pingora peer not built ({args.pingora_bin}); skipping it", file=sys.stderr)
        names.remove("pingora")
    needed = ["nginx", "wrk"] + (["haproxy"] if "haproxy" in names else []) + (["openssl"] if tls else []) \
        + (["h2load"] if any(sc.tool == "h2load" for sc in scenarios) else [])
    for tool in needed:
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install -y nginx-light haproxy wrk nghttp2-client openssl")

    lb_cpu, load_cpu = cores()
    d = tempfile.mkdtemp(prefix="lbbench-")
    os.chmod(d, 0o755)  # NGINX workers drop to an unprivileged user and must read what is here
    with open(f"{d}/big.bin", "wb") as f:
        f.write(os.urandom(64 * 1024))
    os.chmod(f"{d}/big.bin", 0o644)
    with open(f"{d}/cached.bin", "wb") as f:
        f.write(b"backend cached\n" + b"x" * (4096 - 15))
    os.chmod(f"{d}/cached.bin", 0o644)
    if tls:
        make_cert(d)
    open(f"{d}/backends.conf", "w").write(backends_conf(d))
    for p in BACKEND_PORTS + [PLAIN_PORT, TLS_PORT]:
        if port_open(p):
            sys.exit(f"port {p} is already in use; stop whatever listens there first")

    print(f"# balancer on cpu {lb_cpu}, backends + load on cpu {load_cpu}; {args.conns} connections, "
          f"{args.seconds}s x {args.rounds} rounds; work dir {d}", flush=True)
    backends = Proc(pinned(load_cpu, ["nginx", "-p", d, "-c", f"{d}/backends.conf"]), f"{d}/backends.log")
    results = {sc.name: {n: [] for n in names} for sc in scenarios}
    failed, ok = set(), True
    try:
        if not all(wait_until(lambda p=p: port_open(p)) for p in BACKEND_PORTS):
            sys.exit(f"backends did not start: see {d}/backends.err")
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                if name in failed:
                    continue
                # Pingora drains for its grace period on SIGTERM; SIGINT is its fast stop.
                stop = signal.SIGINT if name == "pingora" else signal.SIGTERM
                proc = None if name == "direct" else Proc(pinned(lb_cpu, balancer_argv(name, d, args, tls, cached)),
                                                           f"{d}/{name}.log", stop_signal=stop)
                try:
                    if proc and not (wait_until(lambda: port_open(PLAIN_PORT)) and smoke(f"http://127.0.0.1:{PLAIN_PORT}/")):
                        print(f"!! {name} did not start or serve; log: {d}/{name}.log", file=sys.stderr)
                        failed.add(name)
                        ok = False
                        continue
                    for sc in scenarios:
                        if name == "direct" and (sc.tls or sc.name == "cached") or name == "pingora" and (sc.tls or sc.name == "cached"):
                            continue
                        port = BACKEND_PORTS[0] if name == "direct" else (TLS_PORT if sc.tls else PLAIN_PORT)
                        if rnd == 0:
                            run_load(load_cpu, sc, port, args.conns, 2)  # warm-up
                        before = proc.cpu_seconds() if proc else 0.0
                        fig, raw = run_load(load_cpu, sc, port, args.conns, args.seconds)
                        spent = (proc.cpu_seconds() - before) if proc else float("nan")
                        fig["cpu_us"] = spent * 1e6 / fig["requests"] if fig["requests"] else float("nan")
                        fig["rss_mb"] = proc.rss_mb() if proc else float("nan")
                        if fig["requests"] == 0:
                            print(f"!! {name}/{sc.name}: no figures from the load generator:\n{raw}", file=sys.stderr)
                            ok = False
                        results[sc.name][name].append(fig)
                        print(f"  round {rnd + 1} {sc.name:9s} {name:8s} {fig['rps']:10.0f} rps  "
                              f"p99 {fig['p99']:.2f} ms  cpu {fig['cpu_us']:.1f} us/req  errors {fig['errors']}",
                              flush=True)
                finally:
                    if proc:
                        proc.stop()
                        wait_until(lambda: not port_open(PLAIN_PORT))
    finally:
        backends.stop()

    summary = {}
    for sc in scenarios:
        lat = "mean ms | max ms" if sc.tool == "h2load" else "p50 ms | p99 ms"
        print(f"\n## {sc.name}: {sc.about}\n")
        print(f"| balancer | rps | {lat} | cpu us/req | rss MB | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        summary[sc.name] = {}
        for name in names:
            runs = results[sc.name][name]
            if not runs:
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99", "cpu_us", "rss_mb")}
            med["errors"] = sum(r["errors"] for r in runs)
            summary[sc.name][name] = med
            print(f"| {name} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | {med['cpu_us']:.1f} "
                  f"| {med['rss_mb']:.1f} | {med['errors']} |")
    print()
    for sc in scenarios:
        b = summary[sc.name].get("bascule")
        for peer in PEERS:
            p = summary[sc.name].get(peer)
            if b and p:
                print(f"ratio {sc.name}: rps {b['rps'] / p['rps']:.2f}x {peer}, "
                      f"cpu/req {b['cpu_us'] / p['cpu_us']:.2f}x {peer}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "summary": summary}, f, indent=1)
    shutil.rmtree(d, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
