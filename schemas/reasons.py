"""Machine-readable reason codes for rejected input (documented in docs/devices.md)."""

MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
PAYLOAD_TOO_LARGE = "payload_too_large"
INVALID_ENVELOPE = "invalid_envelope"
INVALID_PAYLOAD = "invalid_payload"
UNKNOWN_TYPE = "unknown_type"
UNKNOWN_DEVICE = "unknown_device"
REVOKED_DEVICE = "revoked_device"
UNKNOWN_REGION = "unknown_region"
UNKNOWN_METRIC = "unknown_metric"
INVALID_VALUE = "invalid_value"
OUT_OF_RANGE = "out_of_range"
INVALID_TIMESTAMP = "invalid_timestamp"
TOO_OLD = "too_old"
TOO_FAR_IN_FUTURE = "too_far_in_future"
TOO_LATE = "too_late"
DUPLICATE = "duplicate"
TOPIC_MISMATCH = "topic_mismatch"
PROCESSING_ERROR = "processing_error"
WEBHOOK_FAILED = "webhook_failed"  # an alert notification the outbound webhook never accepted
# agency service events (issue 4)
INVALID_PMKS_CATEGORY = "invalid_pmks_category"
INVALID_NIK = "invalid_nik"
INVALID_STATUS = "invalid_status"
UNAUTHORIZED = "unauthorized"

ALL = sorted(v for k, v in dict(globals()).items() if k.isupper())
