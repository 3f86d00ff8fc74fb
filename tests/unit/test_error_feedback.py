"""Worker-side rejections answered to devices by the gateway: which ones, what is said, how often."""

import orjson

from infra.settings import Settings
from producers.error_feedback import RateLimiter, WorkerErrorFeedback, reply_for


def letter(**kw):
    base = {"id": "abc", "reason": "unknown_metric", "message": "'foo' is not a metric", "source": "worker",
            "device_id": "wl-1", "topic": "jember.ingest", "partition": 2, "offset": 41,
            "raw": orjson.dumps({"id": "wl-1/1700000000000", "time": "2023-11-14T22:13:20Z"}).decode(),
            "raw_encoding": "utf-8", "time": 1}
    base.update(kw)
    return base


def test_worker_rejection_becomes_a_reply_on_the_device_errors_topic():
    topic, body = reply_for(letter())
    assert topic == "jember/v1/wl-1/errors"
    assert orjson.loads(body) == {"reason": "unknown_metric", "message": "'foo' is not a metric", "id": "abc",
                                  "source": "worker", "event_id": "wl-1/1700000000000",
                                  "time": "2023-11-14T22:13:20Z", "partition": 2, "offset": 41}


def test_gateway_rejections_and_letters_without_a_device_are_not_answered():
    assert reply_for(letter(source="gateway")) is None
    assert reply_for(letter(device_id=None)) is None
    assert reply_for(letter(device_id="a/b/#")) is None  # never a wildcard or another device's topic
    assert reply_for(letter(raw="\xff not json")) is not None  # the raw payload is optional detail
    assert reply_for(letter(raw_encoding="base64", raw="AAAA"))[0] == "jember/v1/wl-1/errors"


def test_rate_limit_per_device():
    now = [0.0]
    rl = RateLimiter(3, clock=lambda: now[0])
    assert [rl.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert rl.allow("b")  # another device has its own bucket
    now[0] += 20.0  # one token a 20 s
    assert rl.allow("a") and not rl.allow("a")


def test_feedback_handles_a_flood_cheaply_and_skips_garbage():
    sent = []
    fb = WorkerErrorFeedback(Settings(gateway_error_replies_per_min=10), lambda t, b: sent.append(t))
    for _ in range(100):
        fb.handle(orjson.dumps(letter()))
    fb.handle(b"not json")
    fb.handle(orjson.dumps(letter(device_id="other")))
    assert len(sent) == 11 and sent[-1] == "jember/v1/other/errors" and fb.dropped == 90
