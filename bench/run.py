"""`arus bench`: run the stages, print each figure against the product's bars, write JSON.

    arus bench [--out FILE] [--only STAGE[,STAGE]] [--quick] [--rate N] [--seconds S]
               [--profile DIR] [--keep]

    arus bench soak [--minutes N] [--soak-rate R]   (opt-in: RSS per process over time, lag, dead letters)
    arus bench query [--quick]   (opt-in: a year for 500 devices; /v1/series and SQL p50/p95, bench/query.py)

Stages: transport, gateway, worker, sink, e2e, latency, alert, window_state (all by default). Services are
embedded (Tansu, PostgreSQL, mosquitto in a temporary directory) unless ARUS_KAFKA_BOOTSTRAP,
ARUS_DATABASE_URL, ARUS_MQTT_URL are set. Each system under test and each load generator is its
own process; everything is stopped at the end, on a failed stage and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from bench.stack import machine_info
from bench.stages import OPT_IN, STAGE_KEYS, STAGES, Context, Sizes, StageError
from bench.stats import build_document, format_table

SERVICE_FREE = {"window_state", "query"}  # query: PostgreSQL only (its own, or the session's)  # stages that need no Kafka/PostgreSQL/MQTT


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="arus bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the figures as JSON to this file")
    p.add_argument("--only", default="", help=f"comma-separated stages among {', '.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run for CI (~2 minutes)")
    p.add_argument("--rate", type=float, help="end-to-end publish rate, messages/s (default 10000)")
    p.add_argument("--seconds", type=float, help="end-to-end duration (default 30)")
    p.add_argument("--latency-rate", type=float, help="the latency stage's moderate rate (default 1000)")
    p.add_argument("--latency-seconds", type=float, help="the latency stage's duration (default 15)")
    p.add_argument("--publishers", type=int, help="MQTT publisher processes (default 2)")
    p.add_argument("--publisher", choices=["raw", "paho"],
                   help="MQTT client of the load generators: raw (a minimal QoS 1 client, ~7 us of CPU per "
                        "message; default) or paho (~70 us per message: at 10,000 msg/s it takes a core)")
    p.add_argument("--devices", type=int, help="devices in the fleet (default 2000)")
    p.add_argument("--worker-n", type=int, help="envelopes preloaded for the worker stage (default 300000)")
    p.add_argument("--sink-n", type=int, help="telemetry messages preloaded for the sink stage (default 300000)")
    p.add_argument("--transport-n", type=int, help="messages of the transport stage (default 300000)")
    p.add_argument("--gateway-n", type=int, help="MQTT messages of the gateway stage (default 100000)")
    p.add_argument("--window-keys", type=int, help="active window keys of the memory stage (default 200000)")
    p.add_argument("--minutes", type=float, dest="soak_minutes", help="soak duration (default 10; `arus bench soak`)")
    p.add_argument("--soak-rate", type=float, help="soak publish rate, messages/s (default 2000)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="attach py-spy to the worker and the sink while they run; collapsed stacks and a "
                        "summary go to DIR (the profiler costs some CPU: take figures from a run without it)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = p.parse_args(argv)
    chosen = ([s.strip() for s in args.only.split(",") if s.strip()] if args.only
              else [s for s in STAGES if s not in OPT_IN])
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose among {', '.join(STAGES)}")
    args.stages = chosen
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    for attr, name in [("rate", "rate"), ("seconds", "seconds"), ("latency_rate", "latency_rate"),
                       ("latency_seconds", "latency_seconds"), ("publishers", "publishers"),
                       ("devices", "devices"), ("worker_n", "worker_n"), ("sink_n", "sink_n"),
                       ("transport_n", "transport_n"), ("gateway_n", "gateway_n"),
                       ("window_keys", "window_keys"), ("publisher", "publisher"),
                       ("soak_minutes", "soak_minutes"), ("soak_rate", "soak_rate")]:
        value = getattr(args, attr)
        if value is not None:
            setattr(sizes, name, type(getattr(sizes, name))(value))
    return sizes


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise _Terminated()


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["--"]:  # `arus bench -- --quick` (the CLI passes the rest through as is)
        argv = argv[1:]
    if argv[:1] == ["soak"]:  # `arus bench soak --minutes N`
        argv = ["--only", "soak", *argv[1:]]
    if argv[:1] == ["query"]:  # `arus bench query [--quick]`: a year for 500 devices, /v1/series p50/p95
        argv = ["--only", "query", *argv[1:]]
    args = parse_args(argv)
    logging.getLogger("infra").setLevel(logging.WARNING)  # topic creation and migrations are not news here
    sizes = sizes_from(args)
    command = "arus bench " + " ".join(shlex.quote(a) for a in argv)
    base = Path(tempfile.mkdtemp(prefix="arus-bench-"))
    os.chmod(base, 0o755)  # the embedded PostgreSQL runs as an unprivileged user when we are root
    ctx = Context(base=base, sizes=sizes, profile_dir=args.profile.absolute() if args.profile else None)
    machine = machine_info()
    ctx.say(f"{command}: stages {', '.join(args.stages)}; {machine['cores']} cores, load average "
            f"{' '.join(str(x) for x in machine['loadavg_before'])}; work dir {base}")
    figures: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    notes: dict[str, str] = {}
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    interrupted = False
    failed = False
    try:
        for name in args.stages:
            ctx.stage = name
            ctx._stage_t0 = time.monotonic()
            load0 = os.getloadavg()
            ctx.say(f"stage {name}: start")
            try:
                if name not in SERVICE_FREE:
                    ctx.services()
                got, details = STAGES[name](ctx)
                figures.update(got)
                stages[name] = {"ok": True, "stage_seconds": round(time.monotonic() - ctx._stage_t0, 1),
                                "loadavg_before": [round(x, 2) for x in load0],
                                "loadavg_after": [round(x, 2) for x in os.getloadavg()], **details}
                ctx.say(f"stage {name}: " + ", ".join(f"{k}={v}" for k, v in got.items()))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one failed stage reports and the others still run
                failed = True
                msg = str(exc) if isinstance(exc, StageError) else f"{type(exc).__name__}: {exc}"
                ctx.say(f"stage {name} FAILED: {msg}")
                if not isinstance(exc, StageError):
                    traceback.print_exc(file=sys.stderr)
                for key in STAGE_KEYS.get(name, ()):
                    figures.setdefault(key, None)
                stages[name] = {"ok": False, "error": msg[:4000],
                                "stage_seconds": round(time.monotonic() - ctx._stage_t0, 1)}
    except KeyboardInterrupt:
        interrupted = True
        ctx.say("interrupted: stopping every process")
        stages.setdefault(ctx.stage, {"ok": False, "error": "interrupted"})
    finally:
        # Ctrl-C again must not leave processes behind: ignore it while cleaning up.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ctx.procs is not None:
            ctx.procs.stop_all()
        if ctx.watch is not None:
            ctx.watch.close()
        if ctx.stack is not None:
            ctx.stack.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous)

    if "alert" not in stages:
        notes["alert_latency_p99_ms"] = "not measured in this run (the `alert` stage did not run)"
    machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    doc = build_document(figures, machine, stages, command, notes)
    print("", file=sys.stderr)
    print(format_table(figures, notes))
    print(f"\nmachine: {machine['cores']} cores ({machine['cpu_model']}), Python {machine['python']}, load average "
          f"before {machine['loadavg_before']} after {machine['loadavg_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"figures written to {args.out}")
    if args.keep or failed or interrupted:
        print(f"logs and data kept in {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main(sys.argv[1:]))
