#!/usr/bin/env python3
"""compare.py's handshake scenario with bascule's TLS listener limited to TLS 1.2.

NGINX 1.22 (Debian 12's) offers TLS 1.2 and older unless `ssl_protocols` says otherwise, so
under compare.py it resumes every connection in TLS 1.2, with no key exchange, while bascule
and HAProxy resume in TLS 1.3, whose resumption makes an X25519 exchange on both ends (OpenSSL
clients offer only the PSK mode with one). This runs the same scenario with bascule speaking
what NGINX speaks (`protocols: [TLSv1.2]`), to separate the protocol's cost from bascule's.

Run from the project root after `cargo build --release`; the arguments after the script's own
are passed to compare.py (default: --rounds 3 --seconds 6).
"""
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
COMPARE = os.path.join(HERE, "..", "..", "shared", "bench", "compare.py")
sys.path.insert(0, os.path.dirname(COMPARE))
import compare  # noqa: E402

d = tempfile.mkdtemp(prefix="bascule-tls12-")
compare.make_cert(d)
config = compare.bascule_conf(d, True).replace("    routes:\n      - upstream: app\nupstreams:",
                                               "      protocols: [TLSv1.2]\n    routes:\n      - upstream: app\nupstreams:")
assert "protocols" in config
with open(f"{d}/bascule-tls12.yaml", "w") as f:
    f.write(config)
extra = sys.argv[1:] or ["--rounds", "3", "--seconds", "6"]
sys.exit(subprocess.call([sys.executable, COMPARE, "--only", "bascule,nginx,haproxy", "--scenarios", "handshake",
                          "--bascule-config", f"{d}/bascule-tls12.yaml"] + extra))
