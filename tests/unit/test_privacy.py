"""infra/privacy.py: NIK validation, keyed hashing, sealing of dead letters."""

from __future__ import annotations

import json

import pytest

from infra import privacy
from schemas.regions import load_regions
from schemas.service_events import synthetic_nik

KEY = b"test-key"
NIK = synthetic_nik("35.09.19", 17, 8, 1985, 7)


def test_validate_nik_accepts_jember_and_other_kabupaten() -> None:
    regions = load_regions()
    assert privacy.validate_nik(NIK, regions) is None
    assert privacy.validate_nik(synthetic_nik("35.09.01", 1, 1, 2001, 12, female=True), list(regions)) is None
    assert privacy.validate_nik("3578015501900003", regions) is None  # Surabaya, woman born 15.01.1990


@pytest.mark.parametrize(
    "nik, fragment",
    [
        ("12345", "16 digits"),
        ("35091917088500a7", "16 digits"),
        ("9909191708850007", "province"),
        ("3500191708850007", "kabupaten"),
        ("3509991708850007", "Jember"),
        ("3509193208850007", "birth date"),
        ("3509191713850007", "birth date"),
        ("3509191708850000", "serial"),
    ],
)
def test_validate_nik_rejects(nik: str, fragment: str) -> None:
    problem = privacy.validate_nik(nik, load_regions())
    assert problem is not None and fragment in problem
    assert nik not in problem  # never quotes the value


def test_pseudonymise_any_depth_and_normalisation() -> None:
    data = {
        "case_id": "C1",
        "person": {"nik": NIK, "name": "  Siti   Aminah ", "phone": "0812-3456-7890"},
        "family": [{"nama": "BUDI"}, {"no_hp": "+62 812 3456 7890"}],
        "Telepon": "081234567890",
        "note": "kept",
    }
    out = privacy.pseudonymise(data, KEY)
    text = json.dumps(out)
    for clear in (NIK, "Siti", "Aminah", "BUDI", "3456"):
        assert clear not in text
    assert out["note"] == "kept" and out["case_id"] == "C1"
    assert out["person"]["name"] == privacy.keyed_hash("name", "siti aminah", KEY)
    # the same phone in three spellings is the same token
    assert out["person"]["phone"] == out["family"][1]["no_hp"] == out["Telepon"]
    assert out["person"]["nik"].startswith("hmac:") and len(out["person"]["nik"]) == 37
    assert privacy.is_pseudonymised(out) and not privacy.is_pseudonymised(data)
    assert privacy.pseudonymise(out, KEY) == out  # idempotent
    assert data["person"]["nik"] == NIK  # input untouched
    assert privacy.pseudonymise(data, b"other-key")["person"]["nik"] != out["person"]["nik"]


def test_seal_roundtrip_and_tamper() -> None:
    token = privacy.seal(b"secret", KEY)
    assert b"secret" not in token.encode()
    assert privacy.unseal(token, KEY) == b"secret"
    with pytest.raises(ValueError):
        privacy.unseal(token, b"wrong")
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(ValueError):
        privacy.unseal(tampered, KEY)
    with pytest.raises(ValueError):
        privacy.unseal("garbage", KEY)


def test_protect_and_restore_raw() -> None:
    env = {"id": "e1", "data": {"person": {"nik": NIK, "name": "Siti"}, "status": "registered"}}
    raw = json.dumps(env)
    protected = privacy.protect_raw(raw, KEY)
    assert NIK not in protected and "Siti" not in protected and "registered" in protected
    assert not privacy.has_personal_data(json.loads(protected))
    assert json.loads(privacy.restore_raw(protected, KEY)) == env
    broken = '{"nik": "' + NIK + '", '
    sealed = privacy.protect_raw(broken, KEY)
    assert NIK not in sealed and sealed.startswith("sealed:")
    assert privacy.restore_raw(sealed, KEY) == broken
