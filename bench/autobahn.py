"""WebSocket conformance: the Autobahn test suite's fuzzingclient against a
rally.py echo route (``@app.websocket("/echo")``), cases 1-7, 9 and 10.

    python bench/autobahn.py [--python2 PATH] [--dir DIR]

Cases 9.1.4-9.1.6, 9.2.4-9.2.6, 9.3 and 9.4 send messages over the 1 MiB
default ``max_message_bytes`` and are left out. PyPI's autobahntestsuite is
Python 2 code: it is installed with ``pip install --target DIR`` under a
Python 2.7 (bench/.autobahn by default) and run with ``site.addsitedir``.
Prints the count of each verdict and every case that is not OK,
NON-STRICT or INFORMATIONAL; exits 1 if there is one, 2 if no Python 2.7.
"""

import argparse
import collections
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ECHO = r"""
import sys
sys.path.insert(0, sys.argv[2])
import rally

app = rally.App()

@app.websocket("/echo")
async def echo(ws: rally.WebSocket) -> None:
    while True:
        await ws.send(await ws.receive())

app.run("127.0.0.1", int(sys.argv[1]), access_log=False)
"""
CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
OVER_1_MIB = ["9.1.4", "9.1.5", "9.1.6", "9.2.4", "9.2.5", "9.2.6", "9.3.*", "9.4.*"]
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}


def find_python2() -> str | None:
    found = sorted(glob.glob("/root/.pyenv/versions/2.7*/bin/python")) + [
        p for p in ("/usr/bin/python2.7", "/usr/bin/python2") if os.path.exists(p)
    ]
    return found[-1] if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python2", default=os.environ.get("AUTOBAHN_PYTHON2") or find_python2())
    parser.add_argument("--dir", default=os.environ.get("AUTOBAHN_DIR", os.path.join(HERE, ".autobahn")))
    args = parser.parse_args()
    if not args.python2:
        print("SKIPPED: the Autobahn suite needs a Python 2.7 (pyenv install 2.7.18)", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.join(args.dir, "autobahntestsuite")):
        print(f"installing autobahntestsuite into {args.dir}", flush=True)
        subprocess.run(
            [args.python2, "-m", "pip", "install", "-q", "--target", args.dir, "autobahntestsuite==25.10.1"],
            check=True,
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", ECHO, str(port), os.path.dirname(HERE)])
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the echo server did not start")
            time.sleep(0.05)
        with tempfile.TemporaryDirectory() as out:
            spec = {
                "outdir": out,
                "servers": [{"agent": "rally.py", "url": f"ws://127.0.0.1:{port}/echo"}],
                "cases": CASES,
                "exclude-cases": OVER_1_MIB,
                "exclude-agent-cases": {},
            }
            with open(os.path.join(out, "spec.json"), "w") as f:
                json.dump(spec, f)
            run = (
                "import site, sys; site.addsitedir(sys.argv[1]); "
                "sys.argv = ['wstest', '-m', 'fuzzingclient', '-s', sys.argv[2]]; "
                "from autobahntestsuite.wstest import run; run()"
            )
            started = time.monotonic()
            subprocess.run(
                [args.python2, "-c", run, args.dir, os.path.join(out, "spec.json")],
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=600,
            )
            took = time.monotonic() - started
            with open(os.path.join(out, "index.json")) as f:
                results = json.load(f)["rally.py"]
    finally:
        server.terminate()
        server.wait(10)
    behavior = collections.Counter(r["behavior"] for r in results.values())
    closing = collections.Counter(r["behaviorClose"] for r in results.values())
    print(f"Autobahn fuzzingclient, {len(results)} cases in {took:.0f} s")
    print("  behavior:      " + ", ".join(f"{k} {v}" for k, v in sorted(behavior.items())))
    print("  close behavior: " + ", ".join(f"{k} {v}" for k, v in sorted(closing.items())))
    bad = sorted(
        (case for case, r in results.items() if r["behavior"] not in PASSING or r["behaviorClose"] not in PASSING),
        key=lambda c: [int(p) for p in c.split(".")],
    )
    for case in bad:
        print(f"  {case}: {results[case]['behavior']} / {results[case]['behaviorClose']}")
    print("no case failed" if not bad else f"{len(bad)} cases failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
