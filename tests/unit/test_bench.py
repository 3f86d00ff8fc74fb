"""The pure parts of `arus bench`: percentile maths, steady-state windows, ratios, the JSON shape,
the realistic data and the profile summary. No services here."""

from __future__ import annotations

import json
import random

import orjson
import pytest

from bench import data
from bench.profile import frame_name, render, summarise
from bench.run import parse_args, sizes_from
from bench.stats import (
    REQUIRED_KEYS,
    Sample,
    build_document,
    format_table,
    latency_summary,
    meets,
    percentile,
    ratio,
    steady_window,
    window_between,
)
from producers.decoding import decode_telemetry
from schemas.envelope import TELEMETRY_TYPE
from schemas.regions import kecamatan_codes, kecamatan_of
from schemas.results import Ok
from schemas.sensors import SENSOR_KINDS

# --------------------------------------------------------------------------- percentiles


def test_percentile_matches_linear_interpolation() -> None:
    values = [15, 20, 35, 40, 50]
    assert percentile(values, 0) == 15
    assert percentile(values, 100) == 50
    assert percentile(values, 50) == 35
    assert percentile(values, 40) == pytest.approx(29.0)  # numpy.percentile(values, 40)
    assert percentile(values, 99) == pytest.approx(49.6)


def test_percentile_ignores_order_and_handles_edges() -> None:
    values = list(range(1, 101))
    random.Random(1).shuffle(values)
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary() -> None:
    s = latency_summary([10.0] * 98 + [500.0, 1000.0])
    assert s["count"] == 100
    assert s["p50"] == 10.0
    assert s["max"] == 1000.0
    assert s["p99"] == pytest.approx(505.0)
    assert latency_summary([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}


# --------------------------------------------------------------------------- steady-state rates


def test_steady_window_skips_startup_and_stops_at_target() -> None:
    samples = [Sample(0.0, 0, 1.0), Sample(1.0, 0, 1.5), Sample(2.0, 0, 2.0),  # start-up
               Sample(3.0, 100, 3.0), Sample(4.0, 200, 4.0), Sample(5.0, 300, 5.0),
               Sample(6.0, 300, 5.1)]  # idle after the end
    w = steady_window(samples, 300)
    assert w is not None
    assert (w.seconds, w.count, w.cpu) == (3.0, 300, 3.0)
    assert w.rate == 100
    assert w.per_cpu == 100


def test_steady_window_without_output_or_target_reached() -> None:
    assert steady_window([Sample(0, 0), Sample(1, 0)], 10) is None
    assert steady_window([], 10) is None
    w = steady_window([Sample(0, 0), Sample(1, 5), Sample(2, 8)], 10)  # never reached: up to the last
    assert w is not None and w.count == 8 and w.seconds == 2
    assert w.per_cpu is None  # no CPU measured


def test_window_between() -> None:
    samples = [Sample(t, 10 * t) for t in range(10)]
    w = window_between(samples, 2.5, 6.5)
    assert w is not None and (w.seconds, w.count) == (5, 50)
    assert window_between(samples, -1, 3) is None


# --------------------------------------------------------------------------- ratios and the document


def test_ratio_and_meets() -> None:
    assert ratio("e2e_eps", 5_000) == 0.5
    assert meets("e2e_eps", 10_000) is True
    assert meets("worker_eps_per_core", 19_999) is False
    assert meets("publish_to_row_p99_ms", 900) is True  # lower is better: under the 1 s bar
    assert meets("window_state_bytes_per_key", 300) is False
    assert ratio("transport_eps", 1e6) is None  # a reference figure has no bar
    assert ratio("e2e_eps", None) is None and meets("e2e_eps", None) is None


def test_document_has_every_required_key_even_when_stages_failed() -> None:
    doc = build_document({"worker_eps_per_core": 25_000, "e2e_eps": None},
                         {"cores": 2, "loadavg_before": [0.1, 0.2, 0.3]},
                         {"worker": {"ok": True}, "e2e": {"ok": False, "error": "boom"}}, "arus bench",
                         {"alert_latency_p99_ms": "not yet measurable"})
    for key in REQUIRED_KEYS:
        assert key in doc
    assert doc["worker_eps_per_core"] == 25_000
    assert doc["alert_latency_p99_ms"] is None
    assert doc["ratios"] == {"worker_eps_per_core": 1.25}
    assert doc["bars"]["sink_rows_per_s"]["bar"] == 150_000
    assert doc["machine"]["cores"] == 2
    assert doc["stages"]["e2e"]["error"] == "boom"
    json.dumps(doc)  # serialisable as is


def test_table_lists_figures_with_ratio_and_verdict() -> None:
    text = format_table({"worker_eps_per_core": 30_000.0, "e2e_eps": None, "publish_to_row_p99_ms": 120.5},
                        {"alert_latency_p99_ms": "not yet measurable"})
    lines = text.splitlines()
    worker = next(line for line in lines if line.startswith("worker"))
    assert "30,000" in worker and "1.50" in worker and worker.rstrip().endswith("yes")
    e2e = next(line for line in lines if line.startswith("end to end"))
    assert "null" in e2e
    assert any("120.5" in line and "goal 100.0" in line for line in lines)
    assert lines[-1] == "note: alert_latency_p99_ms: not yet measurable"


# --------------------------------------------------------------------------- arguments


def test_arguments() -> None:
    args = parse_args(["--only", "worker,sink", "--quick", "--rate", "5000", "--out", "f.json"])
    assert args.stages == ["worker", "sink"]
    sizes = sizes_from(args)
    assert sizes.rate == 5000.0 and sizes.worker_n < 300_000
    assert parse_args([]).stages[0] == "transport"
    with pytest.raises(SystemExit):
        parse_args(["--only", "nope"])


# --------------------------------------------------------------------------- realistic data


def test_fleet_covers_every_kecamatan_with_registered_kinds() -> None:
    devices = data.fleet("bt", 2000)
    assert len({d.device_id for d in devices}) == 2000
    assert {kecamatan_of(d.region) for d in devices} == set(kecamatan_codes())
    for d in devices:
        assert d.kind in SENSOR_KINDS
        assert 2 <= len(d.metrics) <= 3
        assert set(d.metrics) <= set(SENSOR_KINDS[d.kind].metrics)
    assert data.fleet("bt", 50) == devices[:50]  # deterministic


def test_values_are_within_the_plausible_ranges() -> None:
    rng = random.Random(0)
    for d in data.fleet("bt", 100):
        for name, value in data.values_for(rng, d).items():
            m = SENSOR_KINDS[d.kind].metrics[name]
            assert m.min <= value <= m.max


def test_bench_envelope_is_what_the_gateway_makes() -> None:
    dev = data.fleet("bt", 1)[0]
    values = {"waterLevel": 1.25, "flow": 30.5}
    body = data.payload(1_700_000_000_123, 7, values)
    [result] = decode_telemetry(f"jember/v1/{dev.device_id}/telemetry", body, 1_700_000_000_200, 65536)
    assert isinstance(result, Ok)
    assert result.value == data.envelope(dev.device_id, 1_700_000_000_123, 7, values, 1_700_000_000_200)


def test_preload_envelopes_counts_its_rejects() -> None:
    devices = data.fleet("bt", 200)
    st = data.PreloadStats()
    records = list(data.preload_envelopes(devices, 5_000, 1_700_000_000_000, duplicate_rate=0.05,
                                          unknown_rate=0.02, stats=st))
    assert len(records) == st.messages == 5_000
    assert st.valid + st.duplicates + st.unknown == 5_000
    assert st.duplicates > 0 and st.unknown > 0
    ids = [orjson.loads(v)["id"] for _, v in records]
    assert len(ids) - len(set(ids)) == st.duplicates  # every duplicate is an exact redelivery
    registered = {d.device_id for d in devices}
    envs = [orjson.loads(v) for _, v in records]
    assert sum(1 for e in envs if e["subject"] not in registered) == st.unknown
    assert all(e["type"] == TELEMETRY_TYPE for e in envs)
    assert all(k.decode() == e["subject"] for (k, _), e in zip(records, envs, strict=True))


def test_preload_readings_are_reading_messages() -> None:
    st = data.PreloadStats()
    records = list(data.preload_readings(data.fleet("bt", 100), 1_000, 1_700_000_000_000, stats=st))
    msgs = [orjson.loads(v) for _, v in records]
    assert set(msgs[0]) == {"id", "device_id", "kind", "region", "time", "values", "received"}
    assert sum(len(m["values"]) for m in msgs) == st.rows
    assert len({(m["device_id"], m["time"]) for m in msgs}) == 1_000


# --------------------------------------------------------------------------- profile summary


def test_profile_summary() -> None:
    text = (
        "process 1:\"python\";thread (0x1);run (asyncio/base_events.py:600);"
        "process (/work/main/stream_processors/telemetry.py:70);loads (<built-in>) 30\n"
        "process 1:\"python\";thread (0x1);run (asyncio/base_events.py:600);"
        "process (/work/main/stream_processors/telemetry.py:80) 10\n"
    )
    s = summarise(text)
    assert s["samples"]["samples"] == 40
    assert s["total"]["process (stream_processors/telemetry.py)"] == 40
    assert s["self"]["loads (<built-in>)"] == 30
    out = render(s, top=5)
    assert "75.0%  loads (<built-in>)" in out
    assert frame_name("f (/x/site-packages/aiokafka/conn.py:12)") == "f (aiokafka/conn.py)"


def test_soak_summary_tells_flat_from_growing_memory() -> None:
    from bench.stages import soak_summary

    timeline = [{"t": float(t), "worker_rss_mb": 100.0 + (t % 3) * 0.5, "sink_rss_mb": 100.0 + t * 0.5}
                for t in range(0, 600, 5)]
    summary = soak_summary(timeline, ["worker", "sink"])
    assert summary["worker"]["flat"] is True
    assert summary["sink"]["flat"] is False  # 30 MB/min of growth
    assert abs(summary["sink"]["second_half_slope_mb_per_min"] - 30.0) < 0.01


def test_soak_is_opt_in_and_has_its_own_command() -> None:
    from bench.run import parse_args

    assert "soak" not in parse_args([]).stages
    args = parse_args(["--only", "soak", "--minutes", "2"])
    assert args.stages == ["soak"] and sizes_from(args).soak_minutes == 2.0


def test_soak_warm_up_waits_for_the_windows_to_fill_when_the_run_is_long_enough() -> None:
    from bench.stages import soak_summary

    # windows fill for 660 s (growing 4 MB/min), then RSS is flat
    timeline = [{"t": float(t), "worker_rss_mb": 100.0 + min(t, 660) / 15}
                for t in range(0, 1800, 5)]
    long = soak_summary(timeline, ["worker"], fill_s=660)
    assert long["worker"]["warmup_s"] == 660 and long["worker"]["filled"] is True
    assert long["worker"]["flat"] is True
    short = soak_summary([p for p in timeline if p["t"] < 900], ["worker"], fill_s=660)
    assert short["worker"]["filled"] is False  # 15 minutes < twice the fill time: the quarter is used
    assert short["worker"]["warmup_s"] < 660


def test_soak_growth_compares_medians_so_a_snapshot_swing_at_either_end_is_not_growth() -> None:
    from bench.stages import soak_summary

    # flat around 200 MB with a 100 MB snapshot swing every 60 s; the run ends inside a swing
    swing = [{"t": float(t), "worker_rss_mb": 200.0 + (100.0 if t % 60 >= 50 else 0.0)}
             for t in range(0, 1795, 5)]
    flat = soak_summary(swing, ["worker"], fill_s=600)["worker"]
    assert flat["rss_last_sample_mb"] - flat["rss_first_sample_after_warmup_mb"] == 100.0
    assert flat["growth_mb"] == 0.0 and flat["flat"] is True
    # the same swing on top of real growth (2 MB/min) is still growth
    growing = [{"t": p["t"], "worker_rss_mb": p["worker_rss_mb"] + p["t"] / 30} for p in swing]
    grown = soak_summary(growing, ["worker"], fill_s=600)["worker"]
    assert grown["growth_mb"] > 30 and grown["flat"] is False
