#!/usr/bin/env python3
"""Times a broker from spawn to its first SERVING answer of
grpc.health.v1.Health/Check, over several runs.

    python3 bench/health_time.py --addr 127.0.0.1:50051 --runs 10 -- \
        target/release/token-broker serve

The command gets this script's environment (configure the broker with
TOKEN_BROKER_* variables or --config). Each run spawns the command, polls
Check("") on a fresh channel every millisecond (a fresh channel, so no
reconnect backoff delays the first answer), prints the milliseconds from
just before the spawn to the SERVING answer, stops the process with
SIGTERM and waits for it. Needs grpcio and grpcio-health-checking (pip).
"""

import argparse
import signal
import statistics
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def serving(addr: str) -> bool:
    channel = grpc.insecure_channel(addr)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
        return answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def one_run(addr: str, command: list[str], log, limit_s: float) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        while not serving(addr):
            if proc.poll() is not None:
                sys.exit(f"the broker exited with {proc.returncode} before serving")
            if time.perf_counter() - start > limit_s:
                sys.exit(f"no SERVING answer within {limit_s} s")
            time.sleep(0.001)
        return (time.perf_counter() - start) * 1000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--log", default="/dev/null", help="where the broker's output goes")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds to wait per run")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()
    if serving(args.addr):
        sys.exit(f"something already answers on {args.addr}")
    times = []
    with open(args.log, "ab") as log:
        for i in range(args.runs):
            ms = one_run(args.addr, args.command, log, args.limit)
            times.append(ms)
            print(f"run {i + 1}: {ms:.1f} ms to SERVING", flush=True)
    times.sort()
    print(
        f"runs {len(times)}: min {times[0]:.1f} ms, median {statistics.median(times):.1f} ms, "
        f"max {times[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
