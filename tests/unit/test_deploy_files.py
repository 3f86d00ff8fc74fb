"""Static checks of the production deployment files (no Docker engine runs here).

docker-compose.yml, the Dockerfile, .env.example, and the mosquitto / Prometheus configuration they
mount: references resolve, images are pinned, the Arus commands are real `arus` commands, the
environment names real Settings fields, no secret is written in the files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from arus.cli import build_parser
from infra import embedded, mqtt_auth
from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY = ROOT / "infra" / "deploy"

ARUS_COMMANDS = {"migrate", "gateway", "worker", "sink", "api"}
# Env names whose values are secrets: they must come from .env, never be written in the compose file.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|PII_KEY|DATABASE_URL|MQTT_URL", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s/]+)@", re.IGNORECASE)


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """What docker compose makes of ${VAR}, ${VAR:-default}, ${VAR:?message} and $$ with `env` set."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op in (":-", "-"):
            return arg
        return f"<{name}>"

    return INTERPOLATION.sub(sub, value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def is_arus(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("arus:")


def arus_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if is_arus(svc)}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def host_port(mapping: str) -> str | None:
    parts = interpolate(str(mapping)).split(":")
    return parts[-2] if len(parts) >= 2 else None


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume entry; named volumes have a source without a slash."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out.append((str(vol.get("source", "")), str(vol["target"])))
        else:
            parts = interpolate(str(vol)).split(":")
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    return out


def is_local_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


# ----------------------------------------------------------------------------- compose: structure

# Compose Specification keys this file may use (a typo such as `depend_on` is silently ignored by
# some compose versions).
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "secrets", "configs", "include"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "ports", "expose", "volumes",
    "depends_on", "healthcheck", "restart", "stop_grace_period", "stop_signal", "logging", "hostname",
    "networks", "user", "working_dir", "shm_size", "ulimits", "deploy", "labels", "init", "read_only",
    "tmpfs", "cap_drop", "cap_add", "security_opt", "extra_hosts", "profiles", "secrets", "configs", "pid",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}


def test_compose_uses_only_known_keys(compose: dict[str, Any]) -> None:
    for key in compose:
        assert key in TOP_LEVEL_KEYS or key.startswith("x-"), f"unknown top-level key {key}"
    for name, svc in compose["services"].items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name)
        unknown = set(svc) - SERVICE_KEYS
        assert not unknown, f"{name}: unknown keys {unknown}"
        assert set(svc.get("healthcheck") or {}) <= HEALTHCHECK_KEYS, name
        for key in ("interval", "timeout", "start_period"):
            value = (svc.get("healthcheck") or {}).get(key)
            assert value is None or re.fullmatch(r"\d+(ms|s|m|h)", str(value)), f"{name}: {key} {value}"
        command = svc.get("command")
        assert command is None or isinstance(command, (str, list)), name


def test_every_service_has_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if "image" not in svc:
            continue
        image = interpolate(str(svc["image"]))
        assert "<" not in image, f"{name}: image {svc['image']!r} needs a default tag"
        repo, _, tag = image.rpartition(":")
        if "@sha256:" in image:
            continue
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {image!r} is not pinned"


def test_real_engines_are_named(services: dict[str, dict[str, Any]]) -> None:
    images = {name: interpolate(str(svc.get("image", ""))) for name, svc in services.items()}
    assert images["kafka"].startswith("apache/kafka:")
    assert images["timescaledb"].startswith("timescale/timescaledb:")
    assert images["mosquitto"].startswith("eclipse-mosquitto:")
    assert images["prometheus"].startswith("prom/prometheus:")
    assert images["grafana"].startswith("grafana/grafana:")


def test_depends_on_names_existing_services(services: dict[str, dict[str, Any]]) -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        for dep, condition in depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name
            assert condition in conditions, f"{name}: unknown condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"


def test_depends_on_has_no_cycle(services: dict[str, dict[str, Any]]) -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in depends_on(services[name]):
            visit(dep, (*path, name))
        done.add(name)

    for name in services:
        visit(name, ())


def test_mounted_files_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for source, target in bind_mounts(svc):
            assert target.startswith("/"), f"{name}: mount target {target!r} is not absolute"
            if is_local_path(source):
                assert (ROOT / source).resolve().exists(), f"{name} mounts {source}, missing from the repo"
            else:
                assert source in declared, f"{name} uses volume {source!r}, not declared under volumes:"
    used = {src for svc in compose["services"].values() for src, _ in bind_mounts(svc)}
    assert declared <= used, f"declared but unused volumes: {declared - used}"


def test_host_ports_are_unique_and_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[str, str] = {}
    for name, svc in services.items():
        for mapping in svc.get("ports") or []:
            port = host_port(mapping)
            assert port, f"{name}: publish {mapping!r} with an explicit host port"
            assert port not in seen, f"host port {port} of {name} already used by {seen[port]}"
            seen[port] = name
    for name in ("worker", "sink"):  # `docker compose up --scale NAME=N`
        assert "container_name" not in services[name]
        assert not services[name].get("ports"), f"{name} cannot scale with a fixed host port"
    assert host_port(services["api"]["ports"][0]) == "8080"
    assert "${ARUS_HTTP_PORT:-8080}" in str(services["api"]["ports"][0])


def test_long_running_services_have_healthchecks_and_restart(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if name == "migrate":
            assert str(svc.get("restart", "no")) == "no", "migrate is one-shot"
            continue
        assert svc.get("restart") == "unless-stopped", f"{name}: restart policy"
        check = svc.get("healthcheck") or {}
        assert check.get("test"), f"{name}: no healthcheck"
        assert not check.get("disable")


# ----------------------------------------------------------------------------- compose: the Arus services


def test_arus_services_run_real_arus_commands(services: dict[str, dict[str, Any]]) -> None:
    arus = arus_services(services)
    commands = {}
    for name, svc in arus.items():
        command = svc.get("command")
        assert isinstance(command, list) and command, f"{name}: command must be an exec-form list"
        try:
            args = build_parser().parse_args([str(c) for c in command])
        except SystemExit:
            pytest.fail(f"{name}: `arus {shlex.join(map(str, command))}` is not an arus command")
        commands[name] = args.command
    assert set(commands.values()) >= ARUS_COMMANDS, f"missing: {ARUS_COMMANDS - set(commands.values())}"
    # One image for all: the Dockerfile's.
    images = {interpolate(str(svc.get("image", ""))) for svc in arus.values()}
    assert len(images) == 1
    for svc in arus.values():
        build = svc["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_migrate_runs_first(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["command"] == ["migrate"]
    for name, svc in arus_services(services).items():
        if name != "migrate":
            assert depends_on(svc).get("migrate") == "service_completed_successfully", name
    assert depends_on(services["migrate"]).get("timescaledb") == "service_healthy"


def test_arus_env_names_are_settings_fields(services: dict[str, dict[str, Any]]) -> None:
    fields = {"ARUS_" + name.upper() for name in Settings.model_fields}
    for name, svc in arus_services(services).items():
        env = env_of(svc)
        unknown = {k for k in env if k.startswith("ARUS_")} - fields
        assert not unknown, f"{name}: {unknown} are not fields of infra.settings.Settings"
        for required in ("ARUS_KAFKA_BOOTSTRAP", "ARUS_DATABASE_URL", "ARUS_PII_KEY"):
            assert required in env, f"{name} lacks {required}"
        # The values must be what Settings accepts (types, bounds).
        values = {k.removeprefix("ARUS_").lower(): interpolate(v) for k, v in env.items() if k.startswith("ARUS_")}
        Settings.model_validate(values)
    assert "ARUS_MQTT_URL" in env_of(services["gateway"])


def test_metrics_ports_are_set_for_every_service(services: dict[str, dict[str, Any]]) -> None:
    for name in ("gateway", "worker", "sink"):
        port = env_of(services[name]).get(f"ARUS_{name.upper()}_METRICS_PORT")
        assert port and port.isdigit(), f"{name} exposes no metrics port"


# ----------------------------------------------------------------------------- secrets


def test_no_literal_secrets_in_compose(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key):
                literal = INTERPOLATION.sub("", value)
                assert "${" in value and not literal.strip(), f"{name}: {key} must be a ${{...}} reference to .env"
    text = COMPOSE.read_text()
    for m in URL_WITH_PASSWORD.finditer(text):
        assert m.group(1).startswith("${"), f"credentials written in docker-compose.yml: {m.group(0)}"


def test_required_variables_are_documented_in_env_example() -> None:
    text = COMPOSE.read_text()
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    required = {m.group(1) for m in INTERPOLATION.finditer(text) if m.group(2) in (":?", "?")}
    assert required >= {"ARUS_DATABASE_URL", "ARUS_PII_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    for var in {m.group(1) for m in INTERPOLATION.finditer(text)}:
        assert var in example, f"{var} is used by docker-compose.yml but missing from .env.example"
    # The example holds placeholders only, and its ARUS_ names are Settings fields too.
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert "change-me" in value, f".env.example: {key} must be a placeholder"
        if key.startswith("ARUS_") and key != "ARUS_VERSION":
            assert key.removeprefix("ARUS_").lower() in Settings.model_fields, key
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_compose_interpolates_completely_from_env_example() -> None:
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    resolved = interpolate(COMPOSE.read_text(), example)
    assert "${" not in resolved
    assert not re.search(r"<[A-Z][A-Z0-9_]*>", resolved), "a required variable is missing from .env.example"
    doc = yaml.safe_load(resolved)
    api_env = env_of(doc["services"]["api"])
    assert api_env["ARUS_DATABASE_URL"] == example["ARUS_DATABASE_URL"]
    # The database URL the services use names the compose database with its user and password.
    url = example["ARUS_DATABASE_URL"]
    assert f"://{example['POSTGRES_USER']}:{example['POSTGRES_PASSWORD']}@timescaledb:5432/{example['POSTGRES_DB']}" in url
    assert "@mosquitto:1883" in example["ARUS_MQTT_URL"]


# ----------------------------------------------------------------------------- Kafka, MQTT


def test_kafka_runs_kraft_without_zookeeper(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert re.fullmatch(r"\d+@kafka:\d+(,\d+@[\w-]+:\d+)*", env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")[0] == env["KAFKA_NODE_ID"]
    assert interpolate(env["CLUSTER_ID"])
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    text = COMPOSE.read_text().lower()
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "zookeeper" not in uncommented
    assert "zookeeper" not in " ".join(services)
    for name, svc in arus_services(services).items():
        assert interpolate(env_of(svc)["ARUS_KAFKA_BOOTSTRAP"]) == "kafka:9092", name
    assert "3-broker" in COMPOSE.read_text()  # replication for a cluster is documented


def test_mosquitto_conf_requires_auth_and_a_large_inflight_window(services: dict[str, dict[str, Any]]) -> None:
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    settings = {}
    for line in conf.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            settings.setdefault(key, value)
    assert settings["allow_anonymous"] == "false"
    assert int(settings["max_inflight_messages"]) >= 1000
    assert int(settings["max_queued_messages"]) >= 100_000
    assert settings["persistence"] == "true"
    mounts = dict((t, s) for s, t in bind_mounts(services["mosquitto"]))
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./infra/deploy/mosquitto/mosquitto.conf"
    for key in ("password_file", "acl_file", "persistence_location"):
        path = settings[key]
        assert any(path.startswith(target.rstrip("/") + "/") for target in mounts), f"{key} {path} is not mounted"
    # The generated auth files reach mosquitto through a volume the mqtt-auth sidecar writes.
    auth_volume = mounts["/mosquitto/auth"]
    assert auth_volume in {s for s, _ in bind_mounts(services["mqtt-auth"])}


def test_mqtt_auth_sidecar_writes_mosquittos_files_and_reloads_it(services: dict[str, dict[str, Any]]) -> None:
    side = services["mqtt-auth"]
    args = build_parser().parse_args([str(c) for c in side["command"]])
    assert args.command == "mqtt-auth" and args.watch
    # It signals mosquitto by name inside mosquitto's PID namespace ...
    assert side["pid"] == "service:mosquitto" and args.signal_process == "mosquitto"
    assert "mosquitto" in depends_on(side)
    # ... which a process of another uid may do only with CAP_KILL; nothing else beyond file ownership.
    assert set(side["cap_drop"]) == {"ALL"} and "KILL" in side["cap_add"]
    assert set(side["cap_add"]) <= {"KILL", "CHOWN", "FOWNER", "DAC_OVERRIDE"}
    # It writes where mosquitto reads (read-only there), owned by mosquitto's uid, not world-readable.
    side_mounts = {t: s for s, t in bind_mounts(side)}
    mosq_mounts = {t: (s, t) for s, t in bind_mounts(services["mosquitto"])}
    assert str(args.out) in side_mounts
    assert side_mounts[str(args.out)] == mosq_mounts["/mosquitto/auth"][0]
    assert any(str(v).endswith("/mosquitto/auth:ro") for v in services["mosquitto"]["volumes"])
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    assert f"password_file {args.out}/passwd" in conf and f"acl_file {args.out}/acl" in conf
    assert args.owner == "1883:1883" and int(args.mode, 8) & 0o007 == 0
    # The gateway's account comes from ARUS_MQTT_URL, which the sidecar gets like the gateway.
    assert env_of(side)["ARUS_MQTT_URL"] == env_of(services["gateway"])["ARUS_MQTT_URL"]
    assert "healthcheck" in side


@pytest.mark.skipif(not shutil.which("mosquitto_passwd") or embedded._mosquitto_bin() is None,
                    reason="mosquitto not installed")
def test_mosquitto_conf_starts_a_real_broker_that_refuses_anonymous(tmp_path: Path) -> None:
    auth, data = tmp_path / "auth", tmp_path / "data"
    auth.mkdir()
    data.mkdir()
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(auth / "passwd"), "arus-gateway", "s3cret"],
                   check=True, capture_output=True, timeout=10)
    # A device line as the registry generates it (never knowing the secret: only its hash).
    device_hash = mqtt_auth.hash_secret("device-secret")
    with open(auth / "passwd", "a") as f:
        f.write(f"wl-1:{device_hash}\n")
    (auth / "acl").write_text(mqtt_auth.acl_text([mqtt_auth.gateway_account("arus-gateway", "s3cret")]))
    port = embedded.free_port()
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    conf = conf.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
    conf = conf.replace("/mosquitto/auth/", f"{auth}/").replace("/mosquitto/data/", f"{data}/")
    if os.geteuid() == 0:
        conf = "user root\n" + conf  # the tmp files belong to root
    (tmp_path / "mosquitto.conf").write_text(conf)
    mosquitto = embedded._mosquitto_bin()
    assert mosquitto
    proc = subprocess.Popen([mosquitto, "-c", str(tmp_path / "mosquitto.conf")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        rc = None
        while rc is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "mosquitto exited"
            rc = embedded.mqtt_connack("127.0.0.1", port, timeout=0.5)
        assert rc == 5, f"anonymous CONNECT answered {rc}, expected 5 (not authorised)"
        assert _connack_as(port, "wl-1", "device-secret") == 0  # the registry's hash format works
        assert _connack_as(port, "wl-1", "wrong") not in (0, None)  # paho: 135, not authorised
        assert _connack_as(port, "arus-gateway", "s3cret") == 0  # mosquitto_passwd's own line too
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _connack_as(port: int, username: str, password: str) -> int | None:
    import paho.mqtt.client as mqtt

    answered: list[int] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"deploy-{username}")
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: answered.append(int(reason.value))
    client.connect("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not answered and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    client.disconnect()
    return answered[0] if answered else None


# ----------------------------------------------------------------------------- Prometheus


def scrape_targets(config: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    jobs: dict[str, list[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        targets = jobs.setdefault(job["job_name"], [])
        for static in job.get("static_configs") or []:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.append((host, int(port)))
        for dns in job.get("dns_sd_configs") or []:
            assert dns.get("type", "SRV") == "A", "compose DNS answers A records"
            targets.extend((host, int(dns["port"])) for host in dns["names"])
    return jobs


def test_prometheus_scrapes_every_service_at_its_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = scrape_targets(config)
    for job, targets in jobs.items():
        assert targets, f"job {job} has no targets"
        for host, _port in targets:
            assert host == "localhost" or host in services, f"job {job} scrapes {host}, not a compose service"
    by_host = {host: port for targets in jobs.values() for host, port in targets}
    for name in ("gateway", "worker", "sink"):
        assert by_host.get(name) == int(env_of(services[name])[f"ARUS_{name.upper()}_METRICS_PORT"]), name
    assert by_host.get("api") == int(env_of(services["api"])["ARUS_HTTP_PORT"])
    api_job = next(j for j in config["scrape_configs"] if ("api", by_host["api"]) in scrape_targets({"scrape_configs": [j]})[j["job_name"]])
    assert api_job.get("metrics_path", "/metrics") == "/metrics"
    # Scaled workers are found through DNS, one target per replica.
    worker_job = next(j for j in config["scrape_configs"] if j["job_name"] == "worker")
    assert worker_job["dns_sd_configs"][0]["names"] == ["worker"]
    # The rule files are mounted where the config looks for them.
    mounts = {t: s for s, t in bind_mounts(services["prometheus"])}
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into prometheus"
        assert (ROOT / mounts[rule_file]).exists()
    assert mounts["/etc/prometheus/prometheus.yml"] == "./infra/deploy/prometheus/prometheus.yml"


def test_alert_rules_are_well_formed() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = []
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert rule["expr"] and rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            assert rule["labels"]["severity"] in {"info", "warning", "major", "critical"}
            assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0s")))
            assert rule["annotations"]["summary"]
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    text = " ".join(names).lower()
    for topic in ("lag", "deadletter", "workerdown", "kecamatan"):
        assert topic in text, f"no alert about {topic}"


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_is_pinned_non_root_and_runs_arus() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert froms and froms[-1].split()[0].startswith("python:3.11")
    tag = froms[-1].split()[0].split(":", 1)[1]
    assert tag != "latest" and re.match(r"3\.11\.\d+-slim", tag), f"base image {froms[-1]} is not pinned"
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as non-root"
    entry = [rest for op, rest in instructions if op == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["arus"]
    assert any(op == "RUN" and "pip install" in rest for op, rest in instructions)


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    copied = set()
    for op, rest in dockerfile_instructions():
        if op == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repo"
                copied.add(src.rstrip("/"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"include = \[([^\]]*)\]", pyproject)
    assert packages
    for pattern in re.findall(r'"([a-z_]+)\*"', packages.group(1)):
        assert pattern in copied or "." in copied, f"package {pattern} is not copied into the image"
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not (copied & ignored), f"copied but excluded by .dockerignore: {copied & ignored}"
