"""producers.decoding: MQTT payloads → CloudEvents envelopes, and every way a payload is refused."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from producers import decoding
from producers.decoding import (
    MAX_READINGS,
    Compact,
    dead_letter,
    decode_status,
    decode_telemetry,
    device_id_from_topic,
    error_reply,
    register_shape,
)
from schemas import reasons
from schemas.envelope import STATUS_TYPE, TELEMETRY_TYPE, CloudEvent, parse_event_time
from schemas.results import Ok, Rejected
from schemas.sensors import SENSOR_KINDS

TOPIC = "jember/v1/wl-350919-01/telemetry"
RECEIVED = 1_714_543_200_500
MAX = 64 * 1024


def one(payload: Any, topic: str = TOPIC, max_bytes: int = MAX) -> Ok[dict[str, Any]] | Rejected:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    results = decode_telemetry(topic, raw, RECEIVED, max_bytes)
    assert len(results) == 1
    return results[0]


def ok(payload: Any) -> dict[str, Any]:
    result = one(payload)
    assert isinstance(result, Ok), result
    return result.value


def rejected(payload: Any, reason: str, topic: str = TOPIC, max_bytes: int = MAX) -> Rejected:
    result = one(payload, topic, max_bytes)
    assert isinstance(result, Rejected), result
    assert result.reason == reason, result
    assert result.position["topic"] == topic
    assert result.message
    return result


# --------------------------------------------------------------------------- accepted payloads


def test_compact_rfc3339_envelope() -> None:
    env = ok({"ts": "2024-05-01T13:00:00.250+07:00", "seq": 42, "values": {"waterLevel": 1.25, "flow": 12}})
    assert env == {
        "specversion": "1.0",
        "id": "wl-350919-01/1714543200250/42",
        "source": "/jember/v1/wl-350919-01",
        "type": TELEMETRY_TYPE,
        "time": "2024-05-01T06:00:00.250+00:00",
        "subject": "wl-350919-01",
        "datacontenttype": "application/json",
        "arusreceived": RECEIVED,
        "data": {"ts": "2024-05-01T13:00:00.250+07:00", "seq": 42, "values": {"waterLevel": 1.25, "flow": 12}},
    }
    CloudEvent.model_validate(env)  # a valid envelope of the public contract


def test_epoch_ms_and_rfc3339_of_the_same_instant_give_the_same_id() -> None:
    a = ok({"ts": 1714543200250, "seq": 1, "values": {"waterLevel": 1.0}})
    b = ok({"ts": "2024-05-01T13:00:00.250+07:00", "seq": 1, "values": {"waterLevel": 1.0}})
    c = ok({"ts": "2024-05-01T06:00:00.250Z", "seq": 1, "values": {"waterLevel": 1.0}})
    assert a["id"] == b["id"] == c["id"] == "wl-350919-01/1714543200250/1"
    assert a["time"] == b["time"] == c["time"]
    assert a["data"]["ts"] == 1714543200250  # the original is kept as sent


def test_id_without_seq_and_stable_across_repeats() -> None:
    payload = orjson.dumps({"ts": 1714543200000, "values": {"waterLevel": 1.0}})
    first = decode_telemetry(TOPIC, payload, RECEIVED, MAX)[0]
    again = decode_telemetry(TOPIC, payload, RECEIVED + 5000, MAX)[0]
    assert isinstance(first, Ok) and isinstance(again, Ok)
    assert first.value["id"] == again.value["id"] == "wl-350919-01/1714543200000"
    assert first.value["data"]["seq"] is None
    assert again.value["arusreceived"] == RECEIVED + 5000


def test_ids_are_exact_to_the_millisecond() -> None:
    # float arithmetic would turn .123 into .122 for some instants; the id must not wobble
    for ms in range(1714543200000, 1714543201000, 7):
        iso = parse_event_time(ms)
        assert iso is not None
        env = ok({"ts": iso.isoformat(timespec="milliseconds"), "values": {"waterLevel": 1.0}})
        assert env["id"] == f"wl-350919-01/{ms}"


def test_values_are_passed_as_given_semantics_are_downstream() -> None:
    # unknown metrics, strings, out-of-range numbers: the worker judges them against the registry
    env = ok({"ts": 1714543200000, "values": {"nope": "x", "waterLevel": 99999}})
    assert env["data"]["values"] == {"nope": "x", "waterLevel": 99999}
    # extra top-level fields are ignored
    assert ok({"ts": 1714543200000, "values": {}, "battery": 3.3})["data"]["values"] == {}


def test_array_gives_one_envelope_per_reading_with_partial_rejection() -> None:
    payload = orjson.dumps([
        {"ts": 1714543200000, "seq": 1, "values": {"waterLevel": 1.0}},
        {"ts": "yesterday", "seq": 2, "values": {"waterLevel": 1.1}},
        {"ts": 1714543260000, "seq": 3, "values": {"waterLevel": 1.2}},
        7,
    ])
    results = decode_telemetry(TOPIC, payload, RECEIVED, MAX)
    assert [type(r).__name__ for r in results] == ["Ok", "Rejected", "Ok", "Rejected"]
    assert isinstance(results[0], Ok) and results[0].value["id"] == "wl-350919-01/1714543200000/1"
    assert isinstance(results[2], Ok) and results[2].value["id"] == "wl-350919-01/1714543260000/3"
    bad = results[1]
    assert isinstance(bad, Rejected) and bad.reason == reasons.INVALID_TIMESTAMP
    assert bad.position == {"topic": TOPIC, "index": 1}
    assert orjson.loads(bad.raw) == {"ts": "yesterday", "seq": 2, "values": {"waterLevel": 1.1}}
    last = results[3]
    assert isinstance(last, Rejected) and last.reason == reasons.INVALID_PAYLOAD and last.raw == "7"


def test_device_ids_with_dots_and_underscores() -> None:
    results = decode_telemetry("jember/v1/Gauge_1.a-b/telemetry", b'{"ts":0,"values":{}}', RECEIVED, MAX)
    assert isinstance(results[0], Ok) and results[0].value["subject"] == "Gauge_1.a-b"


# --------------------------------------------------------------------------- every reason code


def test_payload_too_large_is_checked_before_decoding() -> None:
    payload = b"\xff" * 300  # not even UTF-8: size wins
    bad = rejected(payload, reasons.PAYLOAD_TOO_LARGE, max_bytes=256)
    assert "300" in bad.message and "256" in bad.message
    assert bad.position["raw_encoding"] == "base64"
    assert base64.b64decode(bad.raw) == b"\xff" * 256  # truncated to max_bytes


def test_payload_too_large_truncates_text_on_a_character_boundary() -> None:
    payload = orjson.dumps({"ts": 0, "values": {}, "note": "é" * 400})
    bad = rejected(payload, reasons.PAYLOAD_TOO_LARGE, max_bytes=256)
    assert len(bad.raw.encode()) <= 256
    assert "raw_encoding" not in bad.position


def test_not_utf8() -> None:
    bad = rejected(b'{"ts": 0, "values": {"a": "\xc3\x28"}}', reasons.NOT_UTF8)
    assert bad.position["raw_encoding"] == "base64"
    assert base64.b64decode(bad.raw) == b'{"ts": 0, "values": {"a": "\xc3\x28"}}'


@pytest.mark.parametrize("payload", [b"{", b'{"ts": 1,}', b"", b"   ", b"hello", b'{"ts": 1} trailing'])
def test_malformed_json(payload: bytes) -> None:
    rejected(payload, reasons.MALFORMED_JSON)


@pytest.mark.parametrize("payload", [
    b'{"ts": 1714543200000, "values": {"waterLevel": NaN}}',
    b'{"ts": 1714543200000, "values": {"waterLevel": Infinity}}',
    b'{"ts": 1714543200000, "values": {"waterLevel": -Infinity}}',
    b'{"ts": 1714543200000, "values": {"waterLevel": 1e999}}',
])
def test_nan_and_infinity_are_named_plainly(payload: bytes) -> None:
    bad = rejected(payload, reasons.MALFORMED_JSON)
    assert "NaN and Infinity are not valid JSON" in bad.message


@pytest.mark.parametrize(("payload", "needle"), [
    ("just a string", "object or an array"),
    (42, "object or an array"),
    (None, "object or an array"),
    ([], "no readings"),
    ({"values": {"waterLevel": 1.0}}, "missing `ts`"),
    ({"ts": 1714543200000}, "missing `values`"),
    ({"ts": 1714543200000, "values": [1, 2]}, "`values` must be an object"),
    ({"ts": 1714543200000, "values": {}, "seq": -1}, "`seq`"),
    ({"ts": 1714543200000, "values": {}, "seq": "7"}, "`seq`"),
    ({"ts": 1714543200000, "values": {}, "seq": True}, "`seq`"),
    ({"temperature": 20}, "expected"),
])
def test_invalid_payload(payload: Any, needle: str) -> None:
    bad = rejected(payload, reasons.INVALID_PAYLOAD)
    assert needle in bad.message
    assert bad.raw == orjson.dumps(payload).decode()


def test_too_many_readings_in_one_array() -> None:
    reading = {"ts": 1714543200000, "values": {"waterLevel": 1.0}}
    assert len(decode_telemetry(TOPIC, orjson.dumps([reading] * MAX_READINGS), RECEIVED, 10**7)) == MAX_READINGS
    bad = rejected(orjson.dumps([reading] * (MAX_READINGS + 1)), reasons.INVALID_PAYLOAD, max_bytes=10**7)
    assert str(MAX_READINGS) in bad.message


@pytest.mark.parametrize("ts", [
    "2024-05-01T13:00:00",  # no offset
    "13:00",
    "not a time",
    -5,
    1e15,
    True,
    None,
    {"t": 1},
])
def test_invalid_timestamp(ts: Any) -> None:
    bad = rejected({"ts": ts, "values": {"waterLevel": 1.0}}, reasons.INVALID_TIMESTAMP)
    assert "RFC 3339" in bad.message


@pytest.mark.parametrize("topic", [
    "jember/v1/wl-1/status",
    "jember/v2/wl-1/telemetry",
    "jember/v1/wl-1/telemetry/extra",
    "jember/v1//telemetry",
    "jember/v1/-leading-dash/telemetry",
    "jember/v1/has space/telemetry",
    "jember/v1/" + "x" * 65 + "/telemetry",
    "other/topic",
])
def test_topic_mismatch(topic: str) -> None:
    rejected({"ts": 1714543200000, "values": {"waterLevel": 1.0}}, reasons.TOPIC_MISMATCH, topic=topic)


def test_device_id_from_topic() -> None:
    assert device_id_from_topic(TOPIC) == "wl-350919-01"
    assert device_id_from_topic(TOPIC, "telemetry") == "wl-350919-01"
    assert device_id_from_topic(TOPIC, "status") is None
    assert device_id_from_topic("jember/v1/a b/telemetry") is None


# --------------------------------------------------------------------------- FIWARE Smart Data Models


def _normalized(entity: dict[str, Any]) -> dict[str, Any]:
    """The NGSI-v2 normalized form of a key-values entity."""
    out: dict[str, Any] = {}
    for key, value in entity.items():
        if key in ("id", "type"):
            out[key] = value
        elif key.startswith("date"):
            out[key] = {"type": "DateTime", "value": value}
        elif isinstance(value, int | float):
            out[key] = {"type": "Number", "value": value}
        else:
            out[key] = {"type": "Text", "value": value}
    return out


OBSERVED = "2024-05-01T06:00:00.000Z"
OBSERVED_ID = "wl-350919-01/1714543200000"
FIWARE_EXAMPLES: list[tuple[dict[str, Any], dict[str, float]]] = [
    ({"id": "urn:ngsi-ld:AirQualityObserved:aq-1", "type": "AirQualityObserved", "dateObserved": OBSERVED,
      "pm25": 35.2, "pm10": 51, "no2": 22.5, "o3": 40, "co": 0.6, "so2": 5.1, "temperature": 29.5,
      "relativeHumidity": 0.74, "airQualityLevel": "moderate", "address": {"addressLocality": "Jember"}},
     {"pm25": 35.2, "pm10": 51, "no2": 22.5, "o3": 40, "co": 0.6, "so2": 5.1, "temperature": 29.5,
      "relativeHumidity": 0.74}),
    ({"id": "urn:ngsi-ld:WeatherObserved:rf-1", "type": "WeatherObserved", "dateObserved": OBSERVED,
      "precipitation": 2.4, "temperature": 24.1, "relativeHumidity": 0.93, "weatherType": "rain"},
     {"precipitation": 2.4, "temperature": 24.1, "relativeHumidity": 0.93}),
    ({"id": "urn:ngsi-ld:TrafficFlowObserved:tf-1", "type": "TrafficFlowObserved",
      "dateObservedFrom": "2024-05-01T05:55:00Z", "dateObservedTo": OBSERVED,
      "intensity": 142, "averageVehicleSpeed": 31.5, "occupancy": 0.41, "laneDirection": "forward"},
     {"intensity": 142, "averageVehicleSpeed": 31.5, "occupancy": 0.41}),
    ({"id": "urn:ngsi-ld:Streetlight:sl-1", "type": "Streetlight", "dateObserved": OBSERVED,
      "illuminanceLevel": 0.6, "powerConsumption": 98.5, "powerState": "on"},
     {"illuminanceLevel": 0.6, "powerConsumption": 98.5}),
    ({"id": "urn:ngsi-ld:WasteContainer:wc-1", "type": "WasteContainer", "dateObserved": OBSERVED,
      "fillingLevel": 0.82, "temperature": 33.0, "status": "ok"},
     {"fillingLevel": 0.82, "temperature": 33.0}),
    ({"id": "urn:ngsi-ld:NoiseLevelObserved:nl-1", "type": "NoiseLevelObserved",
      "dateObservedFrom": "2024-05-01T05:00:00Z", "dateObservedTo": OBSERVED,
      "LAeq": 61.2, "LAmax": 78.4, "sonometerClass": "1"},
     {"LAeq": 61.2, "LAmax": 78.4}),
    ({"id": "urn:ngsi-ld:WaterObserved:wl-1", "type": "WaterObserved", "dateObserved": OBSERVED,
      "height": 1.42, "flow": 23.5, "temperature": 27.0},
     {"waterLevel": 1.42, "flow": 23.5}),
    ({"id": "urn:ngsi-ld:FloodMonitoring:wl-1", "type": "FloodMonitoring", "dateObserved": OBSERVED,
      "currentLevel": 2.31, "referenceLevel": 3.0, "floodLevelStatus": "warning"},
     {"waterLevel": 2.31}),
]


@pytest.mark.parametrize(("entity", "values"), FIWARE_EXAMPLES, ids=[e["type"] for e, _ in FIWARE_EXAMPLES])
@pytest.mark.parametrize("form", ["keyValues", "normalized"])
def test_fiware_entities(entity: dict[str, Any], values: dict[str, float], form: str) -> None:
    payload = entity if form == "keyValues" else _normalized(entity)
    env = ok(payload)
    assert env["id"] == OBSERVED_ID
    assert env["time"] == "2024-05-01T06:00:00.000+00:00"
    assert env["data"]["values"] == values
    assert env["data"]["entity"] == {"id": entity["id"], "type": entity["type"]}
    assert env["data"]["seq"] is None
    # every mapped name is a metric of the catalogue
    all_metrics = {m for kind in SENSOR_KINDS.values() for m in kind.metrics}
    assert set(values) <= all_metrics


def test_fiware_ngsi_ld_properties_and_units() -> None:
    entity = {
        "id": "urn:ngsi-ld:WaterObserved:wl-2", "type": "WaterObserved",
        "@context": ["https://smartdatamodels.org/context.jsonld"],
        "dateObserved": {"type": "Property", "value": {"@type": "DateTime", "@value": OBSERVED}},
        "height": {"type": "Property", "value": 142, "unitCode": "CMT"},
        "flow": {"type": "Property", "value": 23.5, "unitCode": "MQS"},
    }
    env = ok(entity)
    assert env["data"]["values"] == pytest.approx({"waterLevel": 1.42, "flow": 23.5})
    humid = ok({"id": "w", "type": "WeatherObserved", "dateObserved": OBSERVED,
                "relativeHumidity": {"type": "Number", "value": 81,
                                     "metadata": {"unitCode": {"type": "Text", "value": "P1"}}}})
    assert humid["data"]["values"] == pytest.approx({"relativeHumidity": 0.81})


def test_fiware_in_an_array() -> None:
    entity, values = FIWARE_EXAMPLES[1]
    results = decode_telemetry(TOPIC, orjson.dumps([entity, {"ts": 1714543200000, "values": {}}]), RECEIVED, MAX)
    assert all(isinstance(r, Ok) for r in results)
    assert isinstance(results[0], Ok) and results[0].value["data"]["values"] == values


def test_fiware_refusals() -> None:
    bad = rejected({"id": "x", "type": "ParkingSpot", "dateObserved": OBSERVED, "status": "free"},
                   reasons.UNKNOWN_TYPE)
    assert "WaterObserved" in bad.message
    bad = rejected({"id": "x", "type": "WaterObserved", "height": 1.0}, reasons.INVALID_PAYLOAD)
    assert "dateObserved" in bad.message
    bad = rejected({"id": "x", "type": "WaterObserved", "dateObserved": OBSERVED, "height": "high"},
                   reasons.INVALID_PAYLOAD)
    assert "no numeric attribute" in bad.message
    rejected({"id": "x", "type": "WaterObserved", "dateObserved": "soon", "height": 1.0}, reasons.INVALID_TIMESTAMP)


def test_register_shape_extension_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoding, "SHAPES", list(decoding.SHAPES))
    register_shape(
        "senml", lambda obj: "bt" in obj and "e" in obj,
        lambda obj: Compact(obj["bt"], None, {e["n"]: e["v"] for e in obj["e"]}),
    )
    env = ok({"bt": 1714543200000, "e": [{"n": "waterLevel", "v": 1.5}]})
    assert env["data"]["values"] == {"waterLevel": 1.5}
    assert env["id"] == "wl-350919-01/1714543200000"


# --------------------------------------------------------------------------- status


@pytest.mark.parametrize(("payload", "status"), [
    (b"online", "online"), (b"offline", "offline"), (b" ONLINE\n", "online"),
    (b'"offline"', "offline"), (b'{"status": "online"}', "online"),
])
def test_status(payload: bytes, status: str) -> None:
    result = decode_status("jember/v1/wl-350919-01/status", payload, RECEIVED)
    assert isinstance(result, Ok)
    env = result.value
    assert env["type"] == STATUS_TYPE
    assert env["id"] == f"wl-350919-01/status/{RECEIVED}"
    assert env["subject"] == "wl-350919-01"
    assert env["data"] == {"status": status}
    CloudEvent.model_validate(env)


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("jember/v1/wl-1/status", b"maybe", reasons.INVALID_PAYLOAD),
    ("jember/v1/wl-1/status", b'{"status": 1}', reasons.INVALID_PAYLOAD),
    ("jember/v1/wl-1/status", b"\xffonline", reasons.NOT_UTF8),
    ("jember/v1/wl-1/status", b"o" * 1000, reasons.PAYLOAD_TOO_LARGE),
    ("jember/v1/wl 1/status", b"online", reasons.TOPIC_MISMATCH),
    ("jember/v1/wl-1/telemetry", b"online", reasons.TOPIC_MISMATCH),
])
def test_status_refusals(topic: str, payload: bytes, reason: str) -> None:
    result = decode_status(topic, payload, RECEIVED)
    assert isinstance(result, Rejected) and result.reason == reason
    assert result.position["topic"] == topic


# --------------------------------------------------------------------------- dead letters and replies


def test_dead_letter_shape_and_stable_id() -> None:
    bad = rejected(b'{"ts": 1', reasons.MALFORMED_JSON)
    letter = dead_letter(bad, "wl-350919-01", "gateway", 1_714_543_300_000)
    assert set(letter) == {"id", "reason", "message", "source", "device_id", "topic", "partition", "offset",
                           "raw", "raw_encoding", "time"}
    assert letter["reason"] == reasons.MALFORMED_JSON
    assert letter["device_id"] == "wl-350919-01"
    assert letter["topic"] == TOPIC
    assert letter["partition"] is None and letter["offset"] is None
    assert letter["raw"] == '{"ts": 1' and letter["raw_encoding"] == "utf-8"
    assert letter["time"] == 1_714_543_300_000
    # the same bad payload again (later) is the same dead letter; another one is not
    again = dead_letter(rejected(b'{"ts": 1', reasons.MALFORMED_JSON), "wl-350919-01", "gateway", 1)
    assert again["id"] == letter["id"]
    other = dead_letter(rejected(b'{"ts": 2', reasons.MALFORMED_JSON), "wl-350919-01", "gateway", 1)
    assert other["id"] != letter["id"]
    elsewhere = dead_letter(bad, "wl-350919-01", "csv", 1)
    assert elsewhere["id"] != letter["id"]


def test_dead_letter_of_binary_payload_is_base64() -> None:
    bad = rejected(b"\x00\xff\xfe", reasons.NOT_UTF8)
    letter = dead_letter(bad, "wl-350919-01", "gateway", 1)
    assert letter["raw_encoding"] == "base64"
    assert base64.b64decode(letter["raw"]) == b"\x00\xff\xfe"


def test_dead_letter_of_foreign_raw_values() -> None:
    letter = dead_letter(Rejected(reasons.INVALID_ENVELOPE, "x", {"a": 1}, {"topic": "t", "partition": 2,
                                                                           "offset": 9}), None, "worker", 1)
    assert letter["raw"] == '{"a":1}' and letter["partition"] == 2 and letter["offset"] == 9
    assert dead_letter(Rejected(reasons.INVALID_ENVELOPE, "x"), None, "worker", 1)["raw"] == ""


def test_error_reply() -> None:
    results = decode_telemetry(TOPIC, b'[{"ts": 1714543200000, "values": {}}, {"values": {}}]', RECEIVED, MAX)
    bad = results[1]
    assert isinstance(bad, Rejected)
    reply = orjson.loads(error_reply(bad, "dl-1"))
    assert reply == {"reason": reasons.INVALID_PAYLOAD, "message": bad.message, "id": "dl-1", "index": 1}


def test_decoding_never_raises_on_junk() -> None:
    junk = [b"\x00" * 10, b"[" * 5000, b'{"ts": [], "values": {}}', b'[[]]', b'{"ts": {}, "values": null}',
            b'{"type": 5}', b'{"type": "WaterObserved"}', b'{"id": 1, "type": "WaterObserved", "dateObserved": 5}',
            b'[null, true, "x"]', "{\"ts\": \"\u0000\"}".encode()]
    for payload in junk:
        for result in decode_telemetry(TOPIC, payload, RECEIVED, MAX):
            assert isinstance(result, Ok | Rejected)
        assert isinstance(decode_status("jember/v1/x/status", payload, RECEIVED), Ok | Rejected)
