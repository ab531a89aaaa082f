"""Load on the activity page's claim endpoint, and the order publisher's
confirmed throughput.

    python -m benchmarks.web_load --seconds 15 --connections 64 --web-workers 2

1. The publisher: confirmed messages/s from one process with batched
   confirms (``publish_many``), next to one confirm at a time, in this run.
2. The page (``issuance web`` under uvicorn) on a private database, vhost and
   Redis server, loaded by ``wrk`` (a separate process, Debian's package)
   with a unique mobile number per request: requests/s, p50/p99 latency.
   With ``--kill-redis-at S`` the Redis server is killed S seconds into the
   run and started again (empty) three seconds later.
3. The workers then drain the queue; every accepted claim must be credited,
   and ``issuance verify`` must be clean.

Results go to stdout as JSON and, with ``--write``, are appended to
benchmarks/WEB_RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pika
import psycopg
from issuance.shared.db.verify import verify
from issuance.shared.settings import PREFIX, Settings, settings_from
from issuance.shared.wire.messages import OrderPlaced
from issuance.shared.wire.publisher import Publisher, RabbitPublisher

from benchmarks.harness import (
    ROOT,
    ResourceMeter,
    WorkerProcesses,
    _stat,
    free_port,
    private_services,
    profile_summary,
    start_profiler,
)
from benchmarks.pipeline import make_activity

RESULTS = ROOT / "benchmarks" / "WEB_RESULTS.md"

WRK_SCRIPT = r"""
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function init(args)
  slug = args[1]
  base = tonumber(args[2]) + id * 10000000
  ids = io.open(string.format("%s/accepted-%s-%d.txt", args[3], args[2], id), "w")
  ids:setvbuf("line")
  reasons = io.open(string.format("%s/refused-%s-%d.txt", args[3], args[2], id), "w")
  reasons:setvbuf("line")
  counter = 0
  accepted = 0
  refused = 0
  busy = 0
  other = 0
end
function request()
  counter = counter + 1
  local body = string.format('{"activity":"%s","phone":"+86139%08d"}', slug, base + counter)
  return wrk.format("POST", "/api/claims", {["Content-Type"] = "application/json"}, body)
end
function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
    ids:write(string.match(body, '"claim_id":"([%x%-]+)"'), "\n")
  elseif status == 200 then
    refused = refused + 1
    reasons:write(string.match(body, '"reason":"([%w_]+)"') or "?", "\n")
  elseif status == 503 then busy = busy + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  local a, r, b, o = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("accepted"); r = r + t:get("refused"); b = b + t:get("busy"); o = o + t:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_s":%.3f,"accepted":%d,"refused":%d,"busy":%d,"other":%d,' ..
    '"socket_errors":%d,"p50_ms":%.2f,"p90_ms":%.2f,"p99_ms":%.2f,"max_ms":%.2f}\n',
    summary.requests, summary.duration / 1e6, a, r, b, o,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
"""


class PrivateRedis:
    """A Redis server of this run only, so killing it disturbs nobody else."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private Redis did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class PrivateRabbit:
    """A RabbitMQ node of this run only (its own port, name and data
    directory), so killing it mid-run disturbs nobody else."""

    SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.home / "plugins").write_text("[].\n")
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": f"webbench{self.port}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.home / "none"),
            "HOME": str(self.home),
        }
        log = (self.home / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [self.SERVER], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("private RabbitMQ did not start")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def kill(self) -> None:
        """SIGKILL, as a crash: whatever was confirmed must survive it."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


def publisher_rates(settings: Settings, seconds: float) -> dict[str, float]:
    """Confirmed OrderPlaced messages/s: batched confirms vs one at a time."""
    placed_at = datetime.now(UTC)

    def events(start: int, count: int) -> list[OrderPlaced]:
        return [
            OrderPlaced(order_id=f"SO-bench-{n}", member_id=n + 1, amount_cents=1999, placed_at=placed_at)
            for n in range(start, start + count)
        ]

    def measure(publisher: Publisher, chunk: int, one_by_one: bool) -> float:
        sent, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            batch = events(sent, chunk)
            if one_by_one:
                for event in batch:
                    publisher.publish(event)
            else:
                publisher.publish_many(batch)
            sent += chunk
        return sent / (time.monotonic() - started)

    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_many(events(10**8, 100))  # connect and declare outside the clock
        batched = measure(publisher, 2000, one_by_one=False)
        single = measure(publisher, 50, one_by_one=True)
    return {"batched_confirms_msgs_per_s": round(batched), "one_confirm_at_a_time_msgs_per_s": round(single)}


def purge_orders(settings: Settings) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    connection.channel().queue_purge("orders")
    connection.close()


def run_wrk(url: str, script: Path, slug: str, base: int, seconds: int, connections: int) -> dict[str, Any]:
    argv = [
        "wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
        url, "--", slug, str(base), str(script.parent),
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    match = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    result: dict[str, Any] = json.loads(match.group(1))
    result["requests_per_s"] = round(result["requests"] / result["duration_s"])
    return result


def outage(server: PrivateRedis | PrivateRabbit, at: float, seconds: float) -> threading.Thread:
    """Kill ``server`` ``at`` seconds from now and start it again ``seconds`` later."""

    def run() -> None:
        time.sleep(at)
        server.kill()
        time.sleep(seconds)
        server.start()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def credited_among(settings: Settings, claim_ids: list[str]) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM claims WHERE claim_id = ANY(%s::uuid[]) AND status = 'credited'",
            (claim_ids,),
        ).fetchone()
    return int(row[0]) if row else 0


def queue_depths(settings: Settings) -> dict[str, int]:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        return {
            queue: int(channel.queue_declare(queue, passive=True).method.message_count)
            for queue in ("claims", "credits")
        }
    finally:
        connection.close()


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children: during the load, wrk alone."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def claim_counts(settings: Settings, slug: str) -> dict[str, int]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM claims WHERE activity_slug = %s GROUP BY status", (slug,)
        ).fetchall()
    return {status: int(n) for status, n in rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk")
    redis_server = PrivateRedis(free_port())
    redis_server.start()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "write"},
    }
    work = Path(tempfile.mkdtemp(prefix="web-load-"))
    script = work / "claims.lua"
    script.write_text(WRK_SCRIPT)
    rabbit = PrivateRabbit(work) if args.kill_rabbitmq_at else None
    try:
        with private_services("issuance_bench_web") as (_, service_env):
            env = {**service_env, f"{PREFIX}REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0"}
            if rabbit is not None:
                rabbit.start()
                env[f"{PREFIX}AMQP_URL"] = rabbit.url
            settings = settings_from(env)
            results["publisher"] = publisher_rates(settings, args.publisher_seconds)
            purge_orders(settings)
            slug = make_activity(settings, "bench-web", args.budget, args.budget)
            port = free_port()
            page_env = {
                **os.environ,
                **env,
                f"{PREFIX}WEB_RATE_PER_IP": str(10**9),
                f"{PREFIX}WEB_RATE_PER_PHONE": str(10**9),
                # Every request comes from 127.0.0.1: the per-network limit
                # would answer 429 to nearly all of them.
                f"{PREFIX}WEB_RATE_PER_NETWORK": str(10**9),
            }
            argv = [sys.executable, "-m", "issuance.shared.cli", "web", "--port", str(port)]
            argv += ["--workers", str(args.web_workers), "--no-access-log"]
            page = subprocess.Popen(
                argv, env=page_env, cwd=ROOT, stdout=(work / "web.log").open("ab"), stderr=subprocess.STDOUT
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if httpx.get(f"{url}/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline or page.poll() is not None:
                        raise RuntimeError((work / "web.log").read_text()[-3000:])
                    time.sleep(0.2)
                warmup = run_wrk(url, script, slug, 0, 2, args.connections)
                killers = []
                if args.kill_redis_at:
                    killers.append(outage(redis_server, args.kill_redis_at, args.outage_seconds))
                if rabbit is not None:
                    killers.append(outage(rabbit, args.kill_rabbitmq_at, args.outage_seconds))
                page_pids = [page.pid, *children(page.pid)]
                meter = ResourceMeter(None)
                meter.start()
                page_cpu = sum(_stat(pid)[0] for pid in page_pids)
                client_cpu = _children_cpu()
                profiler = (
                    start_profiler(page.pid, args.seconds, work / "page.profile", "--subprocesses")
                    if args.profile
                    else None
                )
                load = run_wrk(url, script, slug, 20_000_000, args.seconds, args.connections)
                page_cpu = sum(_stat(pid)[0] for pid in page_pids) - page_cpu
                client_cpu = _children_cpu() - client_cpu  # before the profiler is reaped
                if profiler is not None:
                    profiler.wait(60)
                    results["profile"] = profile_summary(work / "page.profile")
                usage = meter.stop()
                usage["page_cpu_cores"] = round(page_cpu / load["duration_s"], 2)
                usage["page_cpu_ms_per_request"] = round(page_cpu * 1000 / max(load["requests"], 1), 3)
                usage["page_processes"] = len(page_pids)
                usage["load_generator_cpu_cores"] = round(client_cpu / load["duration_s"], 2)
                usage["load_average"] = os.getloadavg()[0]
                load["cpu"] = usage
                for killer in killers:
                    killer.join()
            finally:
                page.terminate()
                page.wait(30)
            results["load"] = load
            accepted_ids = [
                line for path in sorted(work.glob("accepted-*.txt")) for line in path.read_text().split()
            ]
            accepted = len(accepted_ids)
            reasons = [line for path in work.glob("refused-*.txt") for line in path.read_text().split()]
            load["refused_by_reason"] = {reason: reasons.count(reason) for reason in sorted(set(reasons))}
            assert accepted == warmup["accepted"] + load["accepted"], "every 202 carries its claim ID"
            workers = WorkerProcesses(env, processes=2, threads=8, log=work / "workers.log")
            started = time.monotonic()
            try:
                while time.monotonic() - started < args.drain_timeout:
                    if credited_among(settings, accepted_ids) == accepted:
                        break
                    time.sleep(0.5)
                left = queue_depths(settings)
            finally:
                workers.stop()
            counts = claim_counts(settings, slug)
            credited_accepted = credited_among(settings, accepted_ids)
            with psycopg.connect(settings.database_url) as conn:
                report = verify(conn)
            results["drain"] = {
                "accepted_by_page": accepted,
                "claims_by_status": counts,
                "accepted_claims_credited": credited_accepted,
                # Claim IDs read from each 202 answer, looked up one by one. Extra
                # credited claims are requests wrk cut off at the end, or answered
                # "busy" by a page whose broker died after taking the message.
                "every_accepted_claim_credited": credited_accepted == accepted,
                "messages_left_in_queues": left,
                "drain_seconds": round(time.monotonic() - started, 1),
                "verify_clean": report.clean,
            }
    finally:
        redis_server.kill()
        if rabbit is not None:
            rabbit.kill()
        shutil.rmtree(work, ignore_errors=True)
    return results


def write_markdown(results: dict[str, Any], command: str) -> None:
    load, pub, drain = results["load"], results["publisher"], results["drain"]
    lines = [
        f"## Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{results['machine']['cpus']} CPUs shared by the load generator, uvicorn, RabbitMQ, PostgreSQL"
        " and Redis (and whatever else runs on the box: see the load average).",
        "",
        "```",
        command,
        "```",
        "",
        f"Outages during the load: Redis killed at {results['settings']['kill_redis_at'] or '-'} s,"
        f" RabbitMQ killed at {results['settings']['kill_rabbitmq_at'] or '-'} s, each for"
        f" {results['settings']['outage_seconds']} s plus its restart.",
        "",
        "| claim endpoint (POST /api/claims) | value |",
        "| --- | --- |",
        f"| requests/s | {load['requests_per_s']} |",
        f"| p50 latency | {load['p50_ms']} ms |",
        f"| p90 latency | {load['p90_ms']} ms |",
        f"| p99 latency | {load['p99_ms']} ms |",
        f"| max latency | {load['max_ms']} ms |",
        f"| CPU during the load (cores) | page {load['cpu']['page_cpu_cores']},"
        f" RabbitMQ {load['cpu']['rabbitmq_cpu_cores']}, Redis {load['cpu']['redis_cpu_cores']},"
        f" PostgreSQL {load['cpu']['postgresql_cpu_cores']},"
        f" load generator (wrk, 2 threads) {load['cpu']['load_generator_cpu_cores']};"
        f" load average {load['cpu']['load_average']:.1f} |",
        f"| page server processes | {load['cpu']['page_processes']} ({results['settings']['web_workers']}"
        " uvicorn workers, their supervisor and multiprocessing's resource tracker) |",
        f"| page CPU per request | {load['cpu']['page_cpu_ms_per_request']} ms |",
        f"| accepted / refused / busy / other / socket errors | {load['accepted']} / {load['refused']} /"
        f" {load['busy']} / {load['other']} / {load['socket_errors']} |",
        f"| refused, by reason | {load['refused_by_reason'] or '-'} |",
        f"| accepted by the page (with warm-up) | {drain['accepted_by_page']} |",
        f"| claims after the workers drained | {drain['claims_by_status']}, in"
        f" {drain['drain_seconds']} s; messages left {drain['messages_left_in_queues']} |",
        f"| accepted claims credited (by claim ID) | {drain['accepted_claims_credited']} of"
        f" {drain['accepted_by_page']} |",
        f"| issuance verify clean | {drain['verify_clean']} |",
        "",
        *_profile_lines(results.get("profile")),
        "| order publisher, one process | confirmed messages/s |",
        "| --- | --- |",
        f"| publish_many (batched confirms) | {pub['batched_confirms_msgs_per_s']} |",
        f"| one confirm at a time | {pub['one_confirm_at_a_time_msgs_per_s']} |",
        "",
    ]
    header = "# Activity page and publisher: measured figures\n\nEach run appends a section.\n\n"
    previous = RESULTS.read_text() if RESULTS.exists() else header
    RESULTS.write_text(previous + "\n".join(lines) + "\n")


def _profile_lines(profile: dict[str, Any] | None) -> list[str]:
    if profile is None:
        return []
    lines = [
        f"Where the page's processes were (py-spy, {profile['samples']} samples, self time):",
        "",
        "| frame | share of samples |",
        "| --- | --- |",
    ]
    lines += [f"| `{frame}` | {share} % |" for frame, share in profile["self"].items()]
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--budget", type=int, default=150_000)
    parser.add_argument("--publisher-seconds", type=float, default=3.0)
    parser.add_argument("--kill-redis-at", type=float, default=0.0, help="kill Redis S seconds into the run")
    parser.add_argument(
        "--kill-rabbitmq-at",
        type=float,
        default=0.0,
        help="run a private RabbitMQ node and kill it S seconds in",
    )
    parser.add_argument("--outage-seconds", type=float, default=3.0)
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument(
        "--write", action="store_true", help="append the figures to benchmarks/WEB_RESULTS.md"
    )
    parser.add_argument("--profile", action="store_true", help="sample the page with py-spy during the load")
    args = parser.parse_args()
    results = run(args)
    print(json.dumps(results, indent=2))
    if args.write:
        write_markdown(results, "python -m benchmarks.web_load " + " ".join(sys.argv[1:]))
    ok = results["drain"]["every_accepted_claim_credited"] and results["drain"]["verify_clean"]
    if results["load"]["other"]:
        # Neither accepted, refused nor busy (a 429, a 4xx): the run did not measure claims.
        print(f"{results['load']['other']} answers were neither 202, 200 nor 503", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
