-- 004: device status derived in the stream (stream_processors/device_status.py, consumers/device_status_rows.py).
-- devices.status is 'unknown' until the first transition, then 'online' or 'offline'; status_time is
-- the time of the transition that set it (the sink never lets an older one override a newer one) and
-- status_reason why: status_message (the device or its MQTT last will), reading, or silent.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS status_time timestamptz;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS status_reason text;
CREATE INDEX IF NOT EXISTS devices_status ON devices (status);
