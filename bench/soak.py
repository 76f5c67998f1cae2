"""qbroker soak test (issue 4): many long-polling workers, steady producers, no growth.

One fresh `python -m qbroker serve` (its defaults: every 2xx to a write fsynced), then for
`--seconds` (default 120):

- `--workers` (200) simulated workers: NOT qworker processes. They are lightweight
  raw-HTTP/1.1 keep-alive connections (msgpack bodies), all driven by one epoll loop in
  one forked process, each behaving like a one-slot qworker: `POST /v1/lease` with
  `max=1, wait=5` (a long-poll), and for a job `POST /v1/ack` (the batch form qworker
  uses), then lease again. Worker i consumes queue `soak_{i % queues}`.
- `--producers` (20) producer threads in this process, each with its own
  `qclient.Client` (one keep-alive connection), enqueueing `client.send(queue,
  {"t": time.time()})` to queue `soak_{j % queues}` at a steady pace: `--rate` (200)
  jobs/s in total, each producer on its own fixed schedule (a late send is not made up
  by a burst).
- Status readers (on unless `--no-readers`): every `--burst-every` (15) seconds a burst
  of `--burst-clients` (20) short-lived clients, each with its own connection, reads
  10 recent jobs (`GET /v1/jobs/{id}/result?wait=0`, what `Job.result(timeout=0)`
  sends) -- a dashboard, or a wave of web requests polling their jobs. The broker
  serves reads on threads (trio.to_thread); bursts more than 10 s apart make trio
  retire and later respawn those threads, which is what exposes per-thread leaks.
- A monitor samples the broker once a second: VmRSS (/proc/PID/status), open file
  handles (the entries of /proc/PID/fd), CPU, and the SQLite file sizes.

Per `--window` (10 s) it reports: jobs enqueued, enqueue latency p50/p99/max (the
`send()` call, as a producer sees it), the pickup latency (enqueue -> a worker's lease
reply holding the job) p50/p99, jobs acked, broker RSS and fds at the window's end and its
CPU share. File handles are also counted before any client connects, with all of them
connected (start), at the end while still connected, and after every client disconnected.

Producers stop at `--seconds`; workers keep leasing 3 s more to drain, then stop (their
last long-poll returns within 5 s). Then every enqueued job must be `succeeded`.

Usage:

  python bench/soak.py --quick          # 30 s, 5 s windows
  python bench/soak.py                  # 120 s, 10 s windows (~2.5 min)
  python bench/soak.py --seconds 600 --rate 500
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import random
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import _rawhttp  # noqa: E402
import e2e  # noqa: E402  (Broker, pct, PID bookkeeping; also puts the repo on sys.path)
import msgspec  # noqa: E402
import qclient  # noqa: E402

LEASE_WAIT = 5.0  #: seconds of each worker long-poll, like qworker's
DRAIN_SECONDS = 3.0  #: workers keep leasing this long after producers stop

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode


# ------------------------------------------------------------------ simulated workers


def _request(method: str, path: str, body: Any) -> bytes:
    payload = encode(body)
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/msgpack\r\nAccept: application/msgpack\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


_parse = _rawhttp.parse_reply


class _SimWorker:
    """One connection behaving like a one-slot worker: lease(wait=5) -> ack -> lease."""

    __slots__ = ("buf", "lease_req", "sock", "state")

    def __init__(self, port: int, index: int, queue: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lease_req = _request(
            "POST",
            "/v1/lease",
            {
                "queues": [queue],
                "max": 1,
                "wait": LEASE_WAIT,
                "worker": f"soak-{index}",
            },
        )
        self.buf = b""
        self.state = "lease"


def _workers_main(
    port: int, n: int, queues: int, stop_at: float, go: Any, conn: Any
) -> None:
    """Child process: run n simulated workers until `stop_at` (monotonic), then report."""
    stats: dict[str, Any] = {
        "pickups": [],  # (monotonic time, enqueue->lease seconds)
        "acks": [],  # monotonic times of acks confirmed
        "empty_polls": 0,
        "leases": 0,
        "errors": [],
        "max_poll_s": 0.0,  # the longest an empty long-poll took (should be ~5 s)
    }
    try:
        workers = [_SimWorker(port, i, f"soak_{i % queues}") for i in range(n)]
        conn.send("connected")
        go.wait()
        ep = select.epoll()
        by_fd = {w.sock.fileno(): w for w in workers}
        sent_at: dict[int, float] = {}
        for fd, w in by_fd.items():
            ep.register(fd, select.EPOLLIN)
            w.sock.sendall(w.lease_req)
            sent_at[fd] = time.monotonic()
        while by_fd:
            for fd, _ev in ep.poll(1.0):
                w = by_fd[fd]
                try:
                    data = w.sock.recv(65536)
                except OSError as exc:
                    data = b""
                    stats["errors"].append(f"{type(exc).__name__}: {exc}")
                if not data:
                    stats["errors"].append("the broker closed a worker connection")
                    ep.unregister(fd)
                    del by_fd[fd]
                    continue
                w.buf += data
                got = _parse(w.buf)
                if got is None:
                    continue
                status, body, used = got
                w.buf = w.buf[used:]
                now = time.monotonic()
                if status != 200:
                    stats["errors"].append(f"{w.state}: HTTP {status} {body[:120]!r}")
                    ep.unregister(fd)
                    del by_fd[fd]
                    continue
                if w.state == "lease":
                    stats["leases"] += 1
                    jobs = decode(body)["jobs"]
                    if jobs:
                        wall = time.time()
                        for j in jobs:
                            t = j["kwargs"].get("t")
                            if t is not None:
                                stats["pickups"].append((now, wall - t))
                        acks = [{"id": j["id"], "lease": j["lease"]} for j in jobs]
                        w.state = "ack"
                        w.sock.sendall(_request("POST", "/v1/ack", {"acks": acks}))
                        continue
                    stats["empty_polls"] += 1
                    stats["max_poll_s"] = max(stats["max_poll_s"], now - sent_at[fd])
                else:  # ack reply
                    for r in decode(body)["results"]:
                        if r["ok"]:
                            stats["acks"].append(now)
                        else:
                            stats["errors"].append(f"ack refused: {r.get('error')}")
                    w.state = "lease"
                if now >= stop_at:
                    ep.unregister(fd)
                    del by_fd[fd]
                    continue
                w.sock.sendall(w.lease_req)
                sent_at[fd] = now
            if time.monotonic() > stop_at + LEASE_WAIT + 10:
                stats["errors"].append(f"{len(by_fd)} workers hung past the end")
                break
        ep.close()
        for w in workers:
            w.sock.close()
    except BaseException as exc:  # report, never hang the parent
        stats["errors"].append(f"workers: {type(exc).__name__}: {exc}")
    finally:
        conn.send(stats)
        conn.close()


# ------------------------------------------------------------------ producers, monitor


def _producer(
    url: str,
    queue: str,
    interval: float,
    phase: float,
    t0: float,
    stop_at: float,
    out: list[tuple[float, float]],
    errors: list[str],
    recent: list[str],
) -> None:
    with qclient.Client(url, timeout=10) as client:
        client.health()  # connect before the clock starts
        k = 0
        while True:
            due = t0 + phase + k * interval
            if due >= stop_at:
                return
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > interval:  # fell behind: skip, do not burst
                k += int((now - due) / interval)
                continue
            start = time.monotonic()
            try:
                job = client.send(queue, {"t": time.time()})
            except qclient.QClientError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                out.append((start, time.monotonic() - start))
                recent.append(job.id)  # list.append is atomic under the GIL
            k += 1


def _reader_bursts(
    url: str,
    recent: list[str],
    every: float,
    clients: int,
    t0: float,
    stop_at: float,
    out: list[tuple[float, float]],
    errors: list[str],
) -> None:
    """Every `every` seconds, `clients` threads each read 10 recent jobs, then close."""

    def one(ids: list[str]) -> None:
        try:
            with qclient.Client(url, timeout=10) as client:
                for job_id in ids:
                    start = time.monotonic()
                    client.wait_job(job_id, 0)
                    out.append((start, time.monotonic() - start))
        except qclient.QClientError as exc:
            errors.append(f"reader: {type(exc).__name__}: {exc}")

    k = 1
    while True:
        due = t0 + k * every
        if due >= stop_at:
            return
        time.sleep(max(0.0, due - time.monotonic()))
        pool = recent[-500:]
        if not pool:
            k += 1
            continue
        threads = [
            threading.Thread(
                target=one, args=([pool[(i * 10 + m) % len(pool)] for m in range(10)],)
            )
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        k += 1


def _db_mib(b: e2e.Broker) -> float:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += (b.data / f"qbroker.db{suffix}").stat().st_size
    return total / 2**20


def _monitor(
    b: e2e.Broker, stop: threading.Event, samples: list[dict[str, float]]
) -> None:
    while True:
        samples.append({
            "t": time.monotonic(),
            "rss": b.rss_mib(),
            "fds": b.fds(),
            "cpu": b.cpu(),
            "db": _db_mib(b),
        })  # fmt: skip
        if stop.wait(1.0):
            return


# ------------------------------------------------------------------ the run


def run(a: argparse.Namespace) -> tuple[dict[str, Any], int]:
    ctx = multiprocessing.get_context("fork")
    with e2e.running_broker("soak") as b:
        with qclient.Client(b.url) as c:
            c.health()
        time.sleep(0.5)
        fds_idle = b.fds()
        rss_idle = b.rss_mib()
        samples: list[dict[str, float]] = []
        stop_mon = threading.Event()
        mon = threading.Thread(
            target=_monitor, args=(b, stop_mon, samples), daemon=True
        )

        # workers first (fork before this process starts any thread but the main one)
        setup = time.monotonic()
        go = ctx.Event()
        parent_end, child_end = ctx.Pipe(duplex=False)
        # the schedule is fixed once everyone is connected; pass a generous stop time
        # now and tell the real one through the clock: workers stop at t0 + seconds + drain
        t0_guess = setup + 5.0 + a.workers * 0.005
        stop_workers = t0_guess + a.seconds + DRAIN_SECONDS
        proc = ctx.Process(
            target=_workers_main,
            args=(b.port, a.workers, a.queues, stop_workers, go, child_end),
            daemon=True,
        )
        proc.start()
        e2e.STARTED_PIDS.append(proc.pid)
        child_end.close()
        if not parent_end.poll(60) or parent_end.recv() != "connected":
            raise RuntimeError("the simulated workers did not connect")

        results: list[list[tuple[float, float]]] = [[] for _ in range(a.producers)]
        errors: list[str] = []
        per = a.rate / a.producers
        t0 = t0_guess
        stop_producers = t0 + a.seconds
        recent: list[str] = []
        reads: list[tuple[float, float]] = []
        threads = [
            threading.Thread(
                target=_producer,
                args=(
                    b.url,
                    f"soak_{j % a.queues}",
                    1.0 / per,
                    j / a.rate,
                    t0,
                    stop_producers,
                    results[j],
                    errors,
                    recent,
                ),
                daemon=True,
            )
            for j in range(a.producers)
        ]
        if a.readers:
            threads.append(threading.Thread(
                target=_reader_bursts,
                args=(b.url, recent, a.burst_every, a.burst_clients, t0,
                      stop_producers, reads, errors),
                daemon=True,
            ))  # fmt: skip
        for t in threads:
            t.start()
        mon.start()
        while time.monotonic() < t0 - 0.3:
            time.sleep(0.05)
        fds_start = b.fds()
        rss_start = b.rss_mib()
        go.set()
        for t in threads:
            t.join(max(1.0, stop_producers - time.monotonic() + 15))
        if not parent_end.poll(
            max(1.0, stop_workers - time.monotonic() + LEASE_WAIT + 20)
        ):
            raise RuntimeError("the simulated workers did not report")
        wstats = parent_end.recv()
        proc.join(10)
        time.sleep(1.5)  # let the broker close the connections the workers dropped
        stop_mon.set()
        mon.join(5)
        fds_after = b.fds()
        rss_after = b.rss_mib()
        # "end": the last sample while every client was still connected
        last = [x for x in samples if x["t"] <= stop_producers - 0.05] or samples[-1:]
        fds_end, rss_end = int(last[-1]["fds"]), last[-1]["rss"]
        with qclient.Client(b.url) as c:
            counts: dict[str, int] = {}
            for qs in c.queues():
                for state, n in qs.counts.items():
                    counts[state] = counts.get(state, 0) + n
        broker_pid = b.pid
    enq = sorted((t, lat) for r in results for t, lat in r)
    report = {
        "t0": t0,
        "seconds": a.seconds,
        "window": a.window,
        "workers": a.workers,
        "producers": a.producers,
        "queues": a.queues,
        "rate": a.rate,
        "broker_pid": broker_pid,
        "enqueue": enq,
        "reads": sorted(reads),
        "readers": bool(a.readers),
        "producer_errors": errors,
        "workers_stats": {
            k: v for k, v in wstats.items() if k not in ("pickups", "acks")
        },
        "pickups": wstats["pickups"],
        "acks": wstats["acks"],
        "samples": samples,
        "fds": {
            "idle": fds_idle,
            "start": fds_start,
            "end": fds_end,
            "after": fds_after,
        },
        "rss": {
            "idle": rss_idle,
            "start": rss_start,
            "end": rss_end,
            "after": rss_after,
        },
        "counts": counts,
    }
    bad = bool(errors or wstats["errors"])
    return report, int(bad)


def _window_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    t0, win, secs = r["t0"], r["window"], r["seconds"]
    rows = []
    n_win = round(secs / win)
    prev_cpu = None
    for k in range(n_win):
        lo, hi = t0 + k * win, t0 + (k + 1) * win
        lat = sorted(x for t, x in r["enqueue"] if lo <= t < hi)
        pick = sorted(x for t, x in r["pickups"] if lo <= t < hi)
        acks = sum(1 for t in r["acks"] if lo <= t < hi)
        nreads = sum(1 for t, _ in r["reads"] if lo <= t < hi)
        at_end = [s for s in r["samples"] if s["t"] <= hi]
        at_start = [s for s in r["samples"] if s["t"] <= lo]
        s_end = at_end[-1] if at_end else {"rss": float("nan"), "fds": -1, "cpu": 0.0,
                                           "db": 0.0, "t": hi}  # fmt: skip
        s_start = at_start[-1] if at_start else None
        if s_start is not None and s_end["t"] > s_start["t"]:
            prev_cpu = (
                100 * (s_end["cpu"] - s_start["cpu"]) / (s_end["t"] - s_start["t"])
            )
        rows.append({
            "window": f"{k * win:.0f}-{(k + 1) * win:.0f}s",
            "enqueued": len(lat),
            "enq_p50_ms": e2e.pct(lat, 50) * 1000 if lat else float("nan"),
            "enq_p99_ms": e2e.pct(lat, 99) * 1000 if lat else float("nan"),
            "enq_max_ms": lat[-1] * 1000 if lat else float("nan"),
            "pick_p50_ms": e2e.pct(pick, 50) * 1000 if pick else float("nan"),
            "pick_p99_ms": e2e.pct(pick, 99) * 1000 if pick else float("nan"),
            "acked": acks,
            "reads": nreads,
            "rss_mib": s_end["rss"],
            "fds": s_end["fds"],
            "cpu_pct": prev_cpu,
            "db_mib": s_end["db"],
        })  # fmt: skip
    return rows


def format_report(r: dict[str, Any], argv: str) -> str:
    rows = _window_rows(r)
    out = [
        f"| {'window':>9} | {'enq':>5} | {'enq p50':>7} | {'enq p99':>7} | "
        f"{'enq max':>7} | {'pickup p50':>10} | {'pickup p99':>10} | {'acked':>5} | "
        f"{'reads':>5} | {'RSS MiB':>7} | {'fds':>4} | {'CPU %':>5} | {'db MiB':>6} |",
        "|"
        + "|".join("-" * w for w in (11, 7, 9, 9, 9, 12, 12, 7, 7, 9, 6, 7, 8))
        + "|",
    ]
    for w in rows:
        cpu = f"{w['cpu_pct']:.0f}" if w["cpu_pct"] is not None else "-"
        out.append(
            f"| {w['window']:>9} | {w['enqueued']:>5} | {w['enq_p50_ms']:7.2f} | "
            f"{w['enq_p99_ms']:7.2f} | {w['enq_max_ms']:7.1f} | {w['pick_p50_ms']:10.2f} | "
            f"{w['pick_p99_ms']:10.2f} | {w['acked']:>5} | {w['reads']:>5} | "
            f"{w['rss_mib']:7.1f} | "
            f"{w['fds']:>4} | {cpu:>5} | {w['db_mib']:6.1f} |"
        )
    out.append("")
    out.append(
        "enq = jobs enqueued in the window; latencies in ms; pickup = enqueue -> "
        "lease reply; reads = job reads by the status-reader bursts; RSS/fds/db "
        "(db + WAL files) at the window's end; CPU % of one core."
    )
    fds, rss = r["fds"], r["rss"]
    all_lat = sorted(x for _, x in r["enqueue"])
    ws = r["workers_stats"]
    total_enq = len(r["enqueue"])
    succeeded = r["counts"].get("succeeded", 0)
    p50s = [w["enq_p50_ms"] for w in rows if w["enqueued"]]
    p99s = [w["enq_p99_ms"] for w in rows if w["enqueued"]]
    rss_w = [w["rss_mib"] for w in rows]
    out += [
        "",
        f"open fds: before clients {fds['idle']}, start (all {r['workers'] + r['producers']}"
        f" clients connected) {fds['start']}, end {fds['end']}, after all disconnected "
        f"{fds['after']}  -> start->end {fds['end'] - fds['start']:+d}, "
        f"idle->after {fds['after'] - fds['idle']:+d}: "
        + (
            "no growth"
            if fds["end"] <= fds["start"] and fds["after"] <= fds["idle"]
            else "GROWTH"
        ),
        f"RSS MiB: idle {rss['idle']:.1f}, start {rss['start']:.1f}, end {rss['end']:.1f}, "
        f"after {rss['after']:.1f}; first->last window {rss_w[0]:.1f} -> {rss_w[-1]:.1f} "
        f"({rss_w[-1] - rss_w[0]:+.1f}); second half max-min "
        f"{max(rss_w[len(rss_w) // 2 :]) - min(rss_w[len(rss_w) // 2 :]):.1f}",
        f"enqueue latency over the run: n={total_enq} p50 {e2e.pct(all_lat, 50) * 1000:.2f}"
        f" ms p99 {e2e.pct(all_lat, 99) * 1000:.2f} ms max {all_lat[-1] * 1000:.1f} ms;"
        f" window p50 range {min(p50s):.2f}-{max(p50s):.2f} ms, p99 range "
        f"{min(p99s):.2f}-{max(p99s):.2f} ms",
        f"rate: {total_enq / r['seconds']:.1f} jobs/s enqueued (asked {r['rate']}); "
        f"workers: {ws['leases']} lease replies, {ws['empty_polls']} empty long-polls "
        f"(longest {ws['max_poll_s']:.2f} s), {len(r['acks'])} acks; jobs by state at "
        f"the end: {json.dumps(r['counts'])} -> "
        f"{'all enqueued jobs succeeded' if succeeded == total_enq else 'MISMATCH'}",
        (
            f"status reads: {len(r['reads'])} in bursts, p50 "
            f"{e2e.pct(sorted(x for _, x in r['reads']), 50) * 1000:.2f} ms p99 "
            f"{e2e.pct(sorted(x for _, x in r['reads']), 99) * 1000:.2f} ms"
            if r["reads"]
            else "status reads: none"
            + (" (--no-readers)" if not r["readers"] else " (run shorter than a burst)")
        ),
        f"errors: producers {len(r['producer_errors'])}, workers {len(ws['errors'])}"
        + (
            f" (first: {(r['producer_errors'] + ws['errors'])[0]})"
            if r["producer_errors"] or ws["errors"]
            else ""
        ),
        f"command: {argv}",
    ]
    return "\n".join(out)


def crash_main(a: argparse.Namespace, argv: list[str] | None) -> int:
    """`--crash`: see bench/_crash.py."""
    import _crash

    a.seconds = a.seconds or (20.0 if a.quick else 60.0)
    a.producers = a.producers or 8
    a.seed = random.randrange(2**32) if a.seed is None else a.seed
    cmd = "python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"# soak --crash {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | "
        f"python {platform.python_version()} | {os.cpu_count()} cpus | {a.seconds:g} s, "
        f"{a.kills} broker SIGKILLs (seed {a.seed}), {a.producers} producer threads "
        f"(send() and send_many() of {_crash.BATCH}), workers "
        + ", ".join(f"{p}/{c}" for p, c in _crash.WORKERS)
        + f" --prefetch 1000 | loadavg {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    t_start = time.monotonic()
    rc = 1
    try:
        fig, rc = _crash.run(a)
        print("  " + ", ".join(f"{k}={v}" for k, v in fig.items()))
        print(f"  {'ok' if rc == 0 else 'FAILED'}; command: {cmd}")
        if a.json:
            a.json.write_text(json.dumps(fig))
    finally:
        survivors = e2e.alive(e2e.STARTED_PIDS)
        if survivors:
            e2e.kill_pids(survivors, signal.SIGKILL)
            print(f"WARNING: had to SIGKILL leftover PIDs {survivors}", file=sys.stderr)
            rc = 1
        print(f"# wall time {time.monotonic() - t_start:.0f} s; "
              f"{len(survivors)} started PIDs left")  # fmt: skip
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 s, 5 s windows")
    ap.add_argument("--seconds", type=float, help="producing time (default 120)")
    ap.add_argument("--window", type=float, help="report window seconds (default 10)")
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--producers", type=int, help="threads (default 20; --crash: 8)")
    ap.add_argument("--queues", type=int, default=10)
    ap.add_argument("--rate", type=float, default=200.0, help="jobs/s, all producers")
    ap.add_argument(
        "--no-readers", dest="readers", action="store_false",
        help="no status-reader bursts (producers and workers only)",
    )  # fmt: skip
    ap.add_argument("--burst-every", type=float, default=15.0, help="seconds")
    ap.add_argument("--burst-clients", type=int, default=20)
    ap.add_argument("--json", type=Path, help="also write the raw report here")
    crash = ap.add_argument_group("--crash: the broker SIGKILLed under high load")
    crash.add_argument("--crash", action="store_true", help="run it (bench/_crash.py)")
    crash.add_argument("--kills", type=int, default=10, help="broker SIGKILLs")
    crash.add_argument("--backlog", type=int, default=200_000,
                       help="producers pause while more jobs than this wait")  # fmt: skip
    crash.add_argument("--seed", type=int, help="of the kill times (default: random)")
    a = ap.parse_args(argv)
    if a.crash:
        return crash_main(a, argv)
    a.producers = a.producers or 20
    a.seconds = a.seconds or (30.0 if a.quick else 120.0)
    a.window = a.window or (5.0 if a.quick else 10.0)
    if a.seconds > 420:
        print("note: --seconds above 420 exceeds the ~8 min budget of a bench run")
    cmd = "python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"# soak {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | python "
        f"{platform.python_version()} | {os.cpu_count()} cpus | {a.seconds:g} s, "
        f"{a.workers} simulated workers (raw HTTP, lease wait={LEASE_WAIT:g}, one epoll "
        f"process), {a.producers} producers (qclient threads) at {a.rate:g} jobs/s "
        f"total over {a.queues} queues | "
        + (
            f"reader bursts of {a.burst_clients} clients every {a.burst_every:g} s | "
            if a.readers
            else "no readers | "
        )
        + f"loadavg {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    t_start = time.monotonic()
    rc = 0
    try:
        report, rc = run(a)
        print(format_report(report, cmd))
        if a.json:
            a.json.write_text(json.dumps(report, default=str))
    finally:
        survivors = e2e.alive(e2e.STARTED_PIDS)
        if survivors:
            e2e.kill_pids(survivors, signal.SIGKILL)
            print(f"WARNING: had to SIGKILL leftover PIDs {survivors}", file=sys.stderr)
            rc = 1
        print(
            f"# wall time {time.monotonic() - t_start:.0f} s; {len(e2e.STARTED_PIDS)} "
            f"started PIDs (broker, worker process) checked by PID: "
            f"{len(survivors)} left"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
