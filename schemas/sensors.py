"""The sensor catalogue: kinds, their metrics (Smart Data Models attribute names), units and ranges."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    min: float
    max: float
    description: str


@dataclass(frozen=True, slots=True)
class SensorKind:
    name: str
    description: str
    expected_interval_s: int  # silent longer than this -> offline
    metrics: dict[str, Metric]


def _kind(name: str, description: str, interval: int, *metrics: Metric) -> SensorKind:
    return SensorKind(name, description, interval, {m.name: m for m in metrics})


SENSOR_KINDS: dict[str, SensorKind] = {
    k.name: k
    for k in (
        _kind(
            "water_level", "River/canal gauge (FloodMonitoring, WaterObserved)", 120,
            Metric("waterLevel", "m", -2.0, 30.0, "Water height above the gauge datum"),
            Metric("flow", "m3/s", 0.0, 10000.0, "Discharge"),
        ),
        _kind(
            "rainfall", "Rain gauge (WeatherObserved)", 600,
            Metric("precipitation", "mm", 0.0, 500.0, "Rain since the previous observation"),
            Metric("temperature", "Cel", -10.0, 60.0, "Air temperature"),
            Metric("relativeHumidity", "1", 0.0, 1.0, "Relative humidity as a fraction"),
        ),
        _kind(
            "air_quality", "Air quality station (AirQualityObserved)", 600,
            Metric("pm25", "ug/m3", 0.0, 1000.0, "Fine particulate matter PM2.5"),
            Metric("pm10", "ug/m3", 0.0, 2000.0, "Particulate matter PM10"),
            Metric("no2", "ug/m3", 0.0, 2000.0, "Nitrogen dioxide"),
            Metric("o3", "ug/m3", 0.0, 1000.0, "Ozone"),
            Metric("co", "mg/m3", 0.0, 200.0, "Carbon monoxide"),
            Metric("so2", "ug/m3", 0.0, 2000.0, "Sulphur dioxide"),
            Metric("temperature", "Cel", -10.0, 60.0, "Air temperature"),
            Metric("relativeHumidity", "1", 0.0, 1.0, "Relative humidity as a fraction"),
        ),
        _kind(
            "traffic_flow", "Traffic counter (TrafficFlowObserved)", 600,
            Metric("intensity", "vehicles", 0.0, 20000.0, "Vehicles counted in the observation period"),
            Metric("averageVehicleSpeed", "km/h", 0.0, 250.0, "Mean speed"),
            Metric("occupancy", "1", 0.0, 1.0, "Fraction of time the lane was occupied"),
        ),
        _kind(
            "streetlight", "Street light controller (Streetlight)", 1800,
            Metric("illuminanceLevel", "1", 0.0, 1.0, "Dimming level as a fraction"),
            Metric("powerConsumption", "W", 0.0, 5000.0, "Active power drawn"),
        ),
        _kind(
            "waste_container", "Waste bin fill sensor (WasteContainer)", 3600,
            Metric("fillingLevel", "1", 0.0, 1.0, "Fill level as a fraction"),
            Metric("temperature", "Cel", -10.0, 90.0, "Temperature inside the container"),
        ),
        _kind(
            "noise", "Noise meter (NoiseLevelObserved)", 600,
            Metric("LAeq", "dB(A)", 0.0, 150.0, "Equivalent continuous A-weighted sound level"),
            Metric("LAmax", "dB(A)", 0.0, 160.0, "Maximum A-weighted sound level"),
        ),
    )
}
