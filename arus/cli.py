"""The `arus` command: every service and administrative task of the platform."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from infra.logs import setup_logging
from infra.settings import Settings
from schemas.errors import ArusError


def _settings() -> Settings:
    return Settings()


def cmd_up(args: argparse.Namespace) -> int:
    from arus.supervisor import run_up

    return run_up(_settings(), simulate=args.simulate, simulate_rate=args.rate, agency_rate=args.agency_rate)


def cmd_worker(args: argparse.Namespace) -> int:
    from stream_processors.app import run_worker

    run_worker(_settings())
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from producers.gateway import run_gateway

    run_gateway(_settings())
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from consumers.sink import run_sink

    run_sink(_settings())
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from arus.api import run_api

    run_api(_settings())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from infra.db import migrate

    applied = migrate(_settings().database_dsn())
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from producers.agency_simulator import start_in_thread
    from producers.simulator import run_simulator

    settings = _settings()
    # agency systems producing service events straight to Kafka, beside the devices (MQTT)
    agency = start_in_thread(settings, args.agency_rate, args.duration, args.seed) if args.agency_rate > 0 else None
    try:
        if args.rate > 0:
            result = run_simulator(settings, rate=args.rate, duration=args.duration,
                                   devices_per_kecamatan=args.devices_per_kecamatan, seed=args.seed)
        else:  # --rate 0: agency events only, until the duration or a signal
            result = {}
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: agency[1].set() if agency is not None else None)
            while agency is not None and agency[0].is_alive():
                agency[0].join(0.5)
    finally:
        if agency is not None:
            agency[1].set()
            agency[0].join(timeout=30)
    print({**result, **(agency[2] if agency is not None else {})})
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from infra.db import connect
    from infra.devices import add_device, list_devices, revoke_device, rotate_secret

    with connect(_settings().database_dsn(), autocommit=True) as conn:
        if args.action == "add":
            secret = add_device(conn, args.device_id, args.kind, args.region)
            print(f"device {args.device_id} registered ({args.kind}, {args.region}); its secret, shown once:")
            print(secret)
        elif args.action == "rotate":
            secret = rotate_secret(conn, args.device_id)
            print(f"new secret for {args.device_id}, shown once:")
            print(secret)
        elif args.action == "revoke":
            if not revoke_device(conn, args.device_id):
                print(f"no active device {args.device_id}", file=sys.stderr)
                return 1
            print(f"device {args.device_id} revoked")
        else:
            rows = list_devices(conn)
            print(f"{'device':<28} {'kind':<16} {'region':<16} {'status':<9} last seen (WIB)")
            from zoneinfo import ZoneInfo

            wib = ZoneInfo("Asia/Jakarta")
            for d in rows:
                seen = d.last_seen.astimezone(wib).strftime("%Y-%m-%d %H:%M:%S") if d.last_seen else "-"
                status = "revoked" if d.revoked else d.status
                print(f"{d.device_id:<28} {d.kind:<16} {d.region_code:<16} {status:<9} {seen}")
    return 0


def cmd_operators(args: argparse.Namespace) -> int:
    from infra.operators import main as operators_main

    return operators_main(_settings().database_dsn(), args.action, getattr(args, "name", None))


def cmd_agencies(args: argparse.Namespace) -> int:
    from infra.agencies import main as agencies_main

    return agencies_main(_settings().database_dsn(), args)


def cmd_import_csv(args: argparse.Namespace) -> int:
    from producers.csv_import import main as import_main

    return import_main(_settings(), args)


def cmd_mqtt_auth(args: argparse.Namespace) -> int:
    from infra.mqtt_auth import run_cli

    settings = _settings()
    owner = tuple(int(x) for x in args.owner.split(":")) if args.owner else None
    return run_cli(settings.database_dsn(), settings.mqtt_url, args.out, watch_changes=args.watch,
                   interval=args.interval, signal_pids=args.signal_pid or [], pid_file=args.pid_file,
                   process_name=args.signal_process, mode=int(args.mode, 8),
                   owner=(owner[0], owner[1]) if owner else None)


def cmd_dlq(args: argparse.Namespace) -> int:
    from arus.dlq import main as dlq_main

    return dlq_main(_settings(), args)


def cmd_rules(args: argparse.Namespace) -> int:
    from stream_processors.alerting.rules import check_main

    return check_main(args.file or (str(_settings().rules_file) if _settings().rules_file else None))


def cmd_indicators(args: argparse.Namespace) -> int:
    from arus.indicator_recompute import main as indicators_main

    return indicators_main(_settings(), args)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.run import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arus", description="Arus, Jember's real-time data platform")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole stack (embedded services where no URL is set)")
    up.add_argument("--simulate", action="store_true", help="also run the Jember simulator")
    up.add_argument("--rate", type=int, default=200, help="simulator messages per second")
    up.add_argument("--agency-rate", type=float, default=30.0, help="simulated agency service events per minute")
    up.set_defaults(func=cmd_up)
    for name, func, text in [("worker", cmd_worker, "run the stream processor"),
                             ("gateway", cmd_gateway, "run the MQTT -> Kafka gateway"),
                             ("sink", cmd_sink, "run the Kafka -> PostgreSQL sink"),
                             ("api", cmd_api, "run the HTTP API"),
                             ("migrate", cmd_migrate, "apply database migrations")]:
        sub.add_parser(name, help=text).set_defaults(func=func)
    sim = sub.add_parser("simulate", help="publish realistic Jember telemetry over MQTT")
    sim.add_argument("--rate", type=float, default=100.0, help="messages per second (0: agency events only)")
    sim.add_argument("--duration", type=float, default=60.0, help="seconds; 0 runs forever")
    sim.add_argument("--devices-per-kecamatan", type=int, default=3)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--agency-rate", type=float, default=30.0,
                     help="agency service events per minute (weekly mean, WIB office hours/evenings); 0: none")
    sim.set_defaults(func=cmd_simulate)
    dev = sub.add_parser("devices", help="the device registry")
    dsub = dev.add_subparsers(dest="action", required=True)
    add = dsub.add_parser("add", help="register a device; prints its secret on the last line")
    add.add_argument("device_id")
    add.add_argument("--kind", required=True)
    add.add_argument("--region", required=True, help="Kemendagri code, e.g. 35.09.19.2001")
    for action in ("revoke", "rotate"):
        dsub.add_parser(action).add_argument("device_id")
    dsub.add_parser("list")
    dev.set_defaults(func=cmd_devices)
    ops = sub.add_parser("operators", help="operators who acknowledge/resolve alerts (bearer tokens)")
    osub = ops.add_subparsers(dest="action", required=True)
    osub.add_parser("add", help="add an operator; prints its token on the last line").add_argument("name")
    osub.add_parser("revoke").add_argument("name")
    osub.add_parser("list")
    ops.set_defaults(func=cmd_operators)
    agencies = sub.add_parser("agencies", help="agency API keys for POST /v1/events")
    from infra.agencies import add_arguments as agencies_arguments

    agencies_arguments(agencies)
    agencies.set_defaults(func=cmd_agencies)
    imp = sub.add_parser("import-csv", help="import a spreadsheet export of service events (CSV)")
    from producers.csv_import import add_arguments as import_arguments

    import_arguments(imp)
    imp.set_defaults(func=cmd_import_csv)
    ma = sub.add_parser("mqtt-auth", help="write the MQTT broker's password file and ACL from the registry")
    ma.add_argument("--out", type=Path, required=True, help="directory of passwd and acl")
    ma.add_argument("--watch", action="store_true", help="keep them current; reload the broker on change")
    ma.add_argument("--interval", type=float, default=1.0, help="seconds between registry checks")
    ma.add_argument("--signal-pid", type=int, action="append", help="SIGHUP this pid after a change")
    ma.add_argument("--pid-file", type=Path, help="SIGHUP the pid in this file after a change")
    ma.add_argument("--signal-process", help="SIGHUP processes with this name (e.g. mosquitto)")
    ma.add_argument("--mode", default="600", help="file mode, octal (640: group-readable)")
    ma.add_argument("--owner", help="UID:GID of the files (the broker's user)")
    ma.set_defaults(func=cmd_mqtt_auth)
    dlq = sub.add_parser("dlq", help="dead letters: list, replay after a fix")
    from arus.dlq import add_arguments as dlq_arguments

    dlq_arguments(dlq)
    dlq.set_defaults(func=cmd_dlq)
    rules = sub.add_parser("rules", help="alert rules: check a rules file (default ARUS_RULES_FILE or the shipped one)")
    rules.add_argument("action", choices=["check"])
    rules.add_argument("file", nargs="?", help="rules YAML (see docs/alerts.md)")
    rules.set_defaults(func=cmd_rules)
    ind = sub.add_parser("indicators", help="program indicators: recompute from stored events, check the catalogue")
    from arus.indicator_recompute import add_arguments as indicator_arguments

    indicator_arguments(ind)
    ind.set_defaults(func=cmd_indicators)
    bench = sub.add_parser("bench", help="benchmarks of every stage (see bench/)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


class _Terminated(Exception):
    """SIGTERM before a service installed its own graceful handler: nothing to flush yet."""


def _terminate_early(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    # A SIGTERM during start-up (imports, connecting) is a clean stop, not a crash; each service
    # replaces this handler with its own graceful one (flush, commit) once it runs.
    signal.signal(signal.SIGTERM, _terminate_early)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except _Terminated:
        return 0


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"] and argv[1:2] != ["--"]:
        # bench parses its own options; argparse's REMAINDER refuses ones that come first (--out ...)
        argv = ["bench", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    settings = Settings()
    setup_logging(args.command, json_lines=settings.log_json)
    try:
        return int(args.func(args) or 0)
    except ArusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
