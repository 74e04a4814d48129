"""S3's fan-out curve: one broadcast to N WebSockets, N from 1 000 to 50 000.

    python bench/fanout.py                        # 1k to 50k; rally.py plain and resumed, aiohttp
    python bench/fanout.py --quick                # 10 rounds a size instead of 50
    python bench/fanout.py --sizes 1000,5000 --only rally

For every size a fresh server (bench/servers.py, pinned to CPU 0) takes N
WebSockets from the load generator (bench/loadgen.c, pinned to CPU 1), and
a round is S3 of bench/run.py: one connection sends ``Shout``, and the
round ends when every connection has the push; 50 ms between rounds.
Reported: p50 and p99 of the rounds (with fewer than 100 rounds, p99 is the
slowest), the server's CPU time over the rounds per delivery (µs per
recipient), and the load generator's CPU (its share of the time, and µs per
recipient). rally.py runs twice: plain, and with the resume protocol on
(``&last=0``: numbered pushes, acknowledged as the browser client does;
docs/delivery.md "Delivery across reconnects").

Descriptors: N connections take N descriptors in the server and N in the
load generator. This process raises RLIMIT_NOFILE to fit the largest size
(as root, the hard limit too, up to /proc/sys/fs/nr_open) and both inherit
it; where it cannot, it says so and measures the largest N that fits in
place of the sizes above it. Ports: the load generator connects from
127.0.0.1, 127.0.0.2, ... (10 000 connections each), so no pair of
addresses runs out of ephemeral ports.
"""

import argparse
import os
import resource
import sys
import time

import run  # bench/run.py

SIZES = [1_000, 5_000, 10_000, 20_000, 50_000]
CONFIGS = [("rally", False), ("rally", True), ("aiohttp", False), ("raw", False)]
LABELS = {
    ("rally", False): "rally.py",
    ("rally", True): "rally.py, resume on",
    ("aiohttp", False): "aiohttp",
    ("raw", False): "raw asyncio ceiling",
}
SPARE_FDS = 128  # beyond the connections: listening socket, logs, a batch of accepts
FLAT = 1.25  # per recipient, the largest size against the smallest: "flat" within this factor either way


def raise_nofile(want: int) -> tuple[int, str]:
    """Raises RLIMIT_NOFILE for want connections; returns the most that fit, and what stopped it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = want + SPARE_FDS
    why = ""
    if hard != resource.RLIM_INFINITY and hard < need:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, nr_open), min(need, nr_open)))
        except (ValueError, OSError):
            who = "runs as root but without CAP_SYS_RESOURCE" if os.getuid() == 0 else "does not run as root"
            why = (
                f"RLIMIT_NOFILE's hard limit is {hard:,} and cannot be raised to {need:,}: raising it takes "
                f"CAP_SYS_RESOURCE, and this process {who}"
            )
        else:
            if nr_open < need:
                why = f"/proc/sys/fs/nr_open is {nr_open:,}: no process may have {need:,} descriptors"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fit = want if hard == resource.RLIM_INFINITY else min(want, hard - SPARE_FDS)
    return fit, why


def plan(sizes: list[int], fit: int) -> list[tuple[int, int]]:
    """(size asked, size measured): sizes that do not fit give way to the largest that does, once."""
    out = [(n, n) for n in sizes if n <= fit]
    above = [n for n in sizes if n > fit]
    if above and (not out or out[-1][1] < fit):
        out.append((above[0], fit))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 rounds a size instead of 50")
    parser.add_argument("--rounds", type=int, help="rounds a size (default 50, 10 with --quick)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated connection counts")
    parser.add_argument("--only", default="rally,aiohttp", help="comma-separated targets (rally, aiohttp, raw)")
    args = parser.parse_args()
    rounds = args.rounds or (10 if args.quick else 50)
    sizes = sorted(int(n) for n in args.sizes.split(","))
    configs = [c for c in CONFIGS if c[0] in args.only.split(",")]
    run.loadgen()  # compiled first: without gcc, nothing is measured

    fit, why = raise_nofile(sizes[-1])
    measured = plan(sizes, fit)
    notes = []
    if why:
        skipped = [n for n in sizes if n > fit]
        notes.append(
            f"**Not measured as asked: {', '.join(f'{n:,}' for n in skipped)} connections.** {why}; "
            f"the largest size that fits, {fit:,}, is measured in their place."
        )
        loud = f"bench/fanout.py: {why}.\nSizes above {fit:,} connections cannot be measured here; measuring {fit:,}."
        print("\n*** " + loud.replace("\n", "\n*** ") + "\n", file=sys.stderr, flush=True)
    os.environ["BENCH_MAX_CONNECTIONS"] = str(max(n for _, n in measured))  # rally's max_connections

    begun = time.monotonic()
    results: dict[tuple[str, bool], list[tuple[int, int, dict[str, float]]]] = {}
    for target, resume in configs:
        for asked, n in measured:
            proc, port = run.start(target)
            try:
                r = run.load("broadcast", port, n, rounds, proc.pid, resume=resume)
            finally:
                run.stop(proc)
            results.setdefault((target, resume), []).append((asked, n, r))
            took = time.monotonic() - begun
            print(f"measured {LABELS[target, resume]} at {n:,} ({took:.0f} s)", file=sys.stderr, flush=True)

    rows = []
    for config, runs in results.items():
        for asked, n, r in runs:
            per = 1e6 / (r["rounds"] * n)  # CPU seconds over the rounds to µs per delivery
            cells = [
                f"{n:,}" if n == asked else f"{n:,} ({asked:,} asked)",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['deliveries_per_s']:,.0f}",
                f"{r['server_cpu_s'] * per:.2f}",
                f"{r['loadgen_cpu_s'] * per:.2f}",
                f"{r['server_cpu'] * 100:.0f}% / {r['loadgen_cpu'] * 100:.0f}%",
            ]
            rows.append((LABELS[config], cells))
    header = ["server", "N", "p50 ms", "p99 ms" if rounds >= 100 else "p99 ms (slowest)", "deliveries/s"]
    header += ["server µs / recipient", "loadgen µs / recipient", "CPU server / loadgen"]
    out = [run.table(f"Broadcast fan-out, {rounds} rounds a size (ms until all N received)", rows, header)]
    out += [f"\n{note}" for note in notes]
    out.append("")
    for config, runs in results.items():
        cost = [(n, r["server_cpu_s"] / (r["rounds"] * n) * 1e6) for _, n, r in runs]
        if len(cost) < 2:
            continue
        (n0, c0), (n1, c1) = cost[0], cost[-1]
        verdict = "grows" if c1 > c0 * FLAT else "falls" if c1 < c0 / FLAT else "stays flat"
        low, high = min(c for _, c in cost), max(c for _, c in cost)
        out.append(
            f"- {LABELS[config]}: server CPU per recipient {verdict} from {n0:,} to {n1:,} connections: "
            f"{c0:.2f} µs, then {c1:.2f} µs ({c1 / c0:.2f}×; flat: within {FLAT}× either way); "
            f"{low:.2f} to {high:.2f} µs across the sizes."
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
