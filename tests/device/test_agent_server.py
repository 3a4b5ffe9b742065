"""The agent API over real HTTP on 127.0.0.1, with swtpm behind it.

Covered: quotes that evidence.quote verifies, the IMA list that replays to the quoted PCR 10,
incremental entries, restarts and TPM resets, the UEFI event log, query validation and TPM
failures."""

from __future__ import annotations

import base64
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from tpm2_pytss import ESAPI, ESYS_TR, TPM2_SU, TPM2B_PUBLIC

from device.agent_server import AgentApiServer, AgentEvidence, create_agent_app, read_boot_time
from device.attest import AgentQuoter, AttestationTpm
from device.bootlog_sim import replay_event_log_into_tpm
from device.ima_sim import ImaSimulator, MeasurementListFile
from device.payload import load_or_create_payload_key
from device.tpm import AK_ATTRIBUTES, DeviceTpm
from evidence.eventlog import parse_event_log, verify_event_log
from evidence.findings import Severity
from evidence.ima import parse_ascii_list, replay_pcr10
from evidence.quote import verify_quote
from evidence.tpm import TpmAlg, ak_qualified_name, parse_keylime_quote, parse_tpm2b_public
from tests.device.agent_support import API, AgentStack, agent_stack
from tests.device.conftest import TpmUnderTest
from tests.support.eventlog import EV_POST_CODE, EV_S_CRTM_VERSION, EventLogBuilder

pytestmark = pytest.mark.swtpm


@pytest.fixture
def car(tmp_path: Path) -> Path:
    directory = tmp_path / "mycar"
    directory.mkdir()
    (directory / "manage.py").write_text("print('drive')\n")
    (directory / "config.py").write_text("DRIVE_LOOP_HZ = 20\n")
    return directory


def integrity(stack: AgentStack, nonce: str = "abc123", mask: str = "0x400", partial: str = "1",
              **extra: str) -> dict[str, Any]:
    results: dict[str, Any] = stack.get(f"{API}/quotes/integrity", nonce=nonce, mask=mask,
                                        partial=partial, **extra)["results"]
    return results


def verified_pcrs(stack: AgentStack, results: dict[str, Any], nonce: str) -> dict[int, bytes]:
    """Verify the quote with evidence.quote against the AK and EK; return the quoted PCRs."""
    quote = parse_keylime_quote(results["quote"])
    ak = parse_tpm2b_public(stack.keys.ak.public)
    result = verify_quote(ak, quote.attest_bytes, quote.signature_bytes, nonce=nonce.encode(),
                          pcr_selection=quote.attest.pcr_selection,
                          pcr_values=quote.pcr_file.values,
                          ak_qualified_name=ak_qualified_name(stack.keys.ek.public_area, ak))
    assert result.codes == []
    return dict(quote.pcr_file.values[TpmAlg.SHA256])


# --- Routes and quotes ------------------------------------------------------------------------


def test_version_route(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False) as stack:
        body = stack.get("/version")

    assert body["code"] == 200
    assert body["results"]["supported_version"] == "2.5"
    assert body["results"]["supported_versions"] == ["2.1", "2.2", "2.3", "2.4", "2.5"]


def test_integrity_quote_verifies(blank_swtpm: TpmUnderTest, car: Path, tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car]) as stack:
        results = integrity(stack, nonce="n0nce1", mask="0x401", partial="0")
        pcrs = verified_pcrs(stack, results, "n0nce1")
        pubkey = stack.payload_key.public_pem.decode()

    assert sorted(pcrs) == [0, 10, 16]
    assert pcrs[16] == hashlib.sha256(bytes(32) + hashlib.sha256(pubkey.encode()).digest()).digest()
    assert results["pubkey"] == pubkey
    assert results["hash_alg"] == "sha256"
    assert results["enc_alg"] == "ecc"
    assert results["sign_alg"] == "ecdsa"
    assert results["boottime"] == 1_700_000_000
    assert results["ima_measurement_list_entry"] == 0


def test_partial_one_omits_pubkey(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state") as stack:
        results = integrity(stack, partial="1")

    assert "pubkey" not in results


def test_ima_list_replays_to_quoted_pcr10(blank_swtpm: TpmUnderTest, car: Path,
                                          tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car]) as stack:
        results = integrity(stack, nonce="replay")
        pcrs = verified_pcrs(stack, results, "replay")

    entries = parse_ascii_list(results["ima_measurement_list"])
    assert [entry.path for entry in entries] == [
        "boot_aggregate", str(car / "config.py"), str(car / "manage.py")]
    assert replay_pcr10(entries, "sha256") == pcrs[10]


def test_ima_list_replays_to_quoted_sha1_pcr10(blank_swtpm: TpmUnderTest, car: Path,
                                               tmp_path: Path) -> None:
    """A SHA-1 AK quotes the SHA-1 bank; the same list replays to that bank's PCR 10."""
    esapi = ESAPI(blank_swtpm.tcti)
    tpm = AttestationTpm(esapi, threading.RLock())
    template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha1:null", objectAttributes=AK_ATTRIBUTES)

    def load_ak() -> ESYS_TR:
        handle: ESYS_TR = esapi.create_primary(None, template, ESYS_TR.OWNER)[0]
        return handle

    probe = load_ak()
    ak_public = bytes(esapi.read_public(probe)[0].marshal())
    esapi.flush_context(probe)
    quoter = AgentQuoter(tpm, ak_public, load_ak, load_or_create_payload_key(tmp_path))
    list_path = tmp_path / "ima" / "list"
    ImaSimulator(tpm, list_path, [car]).start()
    evidence = AgentEvidence("sha1-agent", quoter, MeasurementListFile(list_path), None, None)
    server = AgentApiServer(create_agent_app(evidence), "127.0.0.1", 0, None)
    server.start()
    try:
        response = requests.get(f"http://127.0.0.1:{server.port}{API}/quotes/integrity",
                                params={"nonce": "sha1", "mask": "0x400", "partial": "1"},
                                timeout=30)
    finally:
        server.stop()
        quoter.close()
        esapi.close()

    results = response.json()["results"]
    quote = parse_keylime_quote(results["quote"])
    check = verify_quote(parse_tpm2b_public(ak_public), quote.attest_bytes, quote.signature_bytes,
                         nonce=b"sha1", pcr_selection=quote.attest.pcr_selection,
                         pcr_values=quote.pcr_file.values)
    assert check.valid
    assert results["hash_alg"] == "sha1"
    entries = parse_ascii_list(results["ima_measurement_list"])
    assert replay_pcr10(entries, "sha1") == quote.pcr_file.values[TpmAlg.SHA1][10]


def test_identity_quote_covers_pcr16_only(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state") as stack:
        results = stack.get(f"{API}/quotes/identity", nonce="ident")["results"]
        pcrs = verified_pcrs(stack, results, "ident")
        pubkey = stack.payload_key.public_pem.decode()

    assert sorted(pcrs) == [16]
    assert results["pubkey"] == pubkey
    assert "ima_measurement_list" not in results


def test_pubkey_route(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False) as stack:
        body = stack.get(f"{API}/keys/pubkey")
        pubkey = stack.payload_key.public_pem.decode()

    assert body["results"] == {"pubkey": pubkey}


# --- IMA entries over the API -----------------------------------------------------------------


def test_incremental_ima_entries(blank_swtpm: TpmUnderTest, car: Path, tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car]) as stack:
        assert stack.simulator is not None
        first = integrity(stack, nonce="first", ima_ml_entry="0")
        (car / "config.py").write_text("DRIVE_LOOP_HZ = 40\n")
        stack.simulator.measure()
        second = integrity(stack, nonce="second", ima_ml_entry="3")
        pcrs = verified_pcrs(stack, second, "second")
        nothing_new = integrity(stack, nonce="third", ima_ml_entry="4")
        after_reboot = integrity(stack, nonce="fourth", ima_ml_entry="9")

    first_entries = parse_ascii_list(first["ima_measurement_list"])
    new_entries = parse_ascii_list(second["ima_measurement_list"], start_index=3)
    assert second["ima_measurement_list_entry"] == 3
    assert len(new_entries) == 1
    assert new_entries[0].path == str(car / "config.py")
    assert new_entries[0].digest == hashlib.sha256(b"DRIVE_LOOP_HZ = 40\n").digest()
    assert replay_pcr10([*first_entries, *new_entries], "sha256") == pcrs[10]
    assert nothing_new["ima_measurement_list"] == ""
    assert nothing_new["ima_measurement_list_entry"] == 4
    assert after_reboot["ima_measurement_list_entry"] == 0
    assert len(parse_ascii_list(after_reboot["ima_measurement_list"])) == 4


def test_agent_restart_keeps_list(blank_swtpm: TpmUnderTest, car: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_stack(blank_swtpm.tcti, state, measure=[car]) as stack:
        keys = stack.keys
        before = integrity(stack, nonce="before")

    (car / "manage.py").write_text("print('drive faster')\n")
    with agent_stack(blank_swtpm.tcti, state, measure=[car], keys=keys) as stack:
        after = integrity(stack, nonce="after")
        pcrs = verified_pcrs(stack, after, "after")

    entries = parse_ascii_list(after["ima_measurement_list"])
    assert after["ima_measurement_list"].startswith(before["ima_measurement_list"])
    assert len(entries) == 4
    assert entries[3].path == str(car / "manage.py")
    assert replay_pcr10(entries, "sha256") == pcrs[10]


def reboot(tpm: TpmUnderTest) -> None:
    """Restart swtpm as a device reboot does: TPM2_Shutdown(SU_CLEAR) first, so that the TPM
    clock stays safe, then TPM2_Startup(SU_CLEAR) on start (resetCount grows)."""
    esapi = tpm.swtpm.esapi()
    esapi.shutdown(TPM2_SU.CLEAR)
    esapi.close()
    tpm.swtpm.restart()


def test_swtpm_restart_starts_new_list(blank_swtpm: TpmUnderTest, car: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_stack(blank_swtpm.tcti, state, measure=[car]) as stack:
        keys = stack.keys
        before = integrity(stack, nonce="before")
        (car / "manage.py").write_text("print('changed before the reboot')\n")
        assert stack.simulator is not None
        stack.simulator.measure()

    reboot(blank_swtpm)
    with agent_stack(blank_swtpm.swtpm.tcti, state, measure=[car], keys=keys) as stack:
        after = integrity(stack, nonce="after")
        pcrs = verified_pcrs(stack, after, "after")

    old_quote = parse_keylime_quote(before["quote"]).attest
    new_quote = parse_keylime_quote(after["quote"]).attest
    entries = parse_ascii_list(after["ima_measurement_list"])
    assert new_quote.clock_info.reset_count == old_quote.clock_info.reset_count + 1
    assert [entry.path for entry in entries] == [
        "boot_aggregate", str(car / "config.py"), str(car / "manage.py")]
    assert replay_pcr10(entries, "sha256") == pcrs[10]


# --- UEFI event log ----------------------------------------------------------------------------


def boot_log() -> bytes:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.add(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le") + b"\0\0")
    builder.add(0, EV_POST_CODE, b"POST CODE")
    builder.separator(range(8))
    return builder.build()


def test_event_log_sent_with_pcr0(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    raw = boot_log()
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        replay_event_log_into_tpm(AttestationTpm.for_device(device), raw)

    with agent_stack(blank_swtpm.tcti, tmp_path / "state", event_log=raw) as stack:
        with_pcr0 = integrity(stack, nonce="boot", mask="0xff")
        pcrs = verified_pcrs(stack, with_pcr0, "boot")
        without_pcr0 = integrity(stack, nonce="noboot", mask="0x400")

    sent = base64.b64decode(with_pcr0["mb_measurement_list"])
    findings = verify_event_log(parse_event_log(sent), {"sha256": pcrs},
                                pcr_indexes=frozenset(range(8)))
    assert sent == raw
    assert [finding.code for finding in findings if finding.severity >= Severity.WARNING] == []
    assert "mb_measurement_list" not in without_pcr0


# --- Errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"mask": "0x400", "partial": "1"}, "nonce"),
        ({"nonce": "", "mask": "0x400", "partial": "1"}, "nonce"),
        ({"nonce": "abc-123", "mask": "0x400", "partial": "1"}, "nonce"),
        ({"nonce": "a" * 65, "mask": "0x400", "partial": "1"}, "nonce"),
        ({"nonce": "n\u00e9", "mask": "0x400", "partial": "1"}, "nonce"),
        ({"nonce": "abc", "partial": "1"}, "mask"),
        ({"nonce": "abc", "mask": "0xzz", "partial": "1"}, "mask"),
        ({"nonce": "abc", "mask": "0x1000000", "partial": "1"}, "mask"),
        ({"nonce": "abc", "mask": "", "partial": "1"}, "mask"),
        ({"nonce": "abc", "mask": "0x400"}, "partial"),
        ({"nonce": "abc", "mask": "0x400", "partial": "2"}, "partial"),
        ({"nonce": "abc", "mask": "0x400", "partial": "1", "ima_ml_entry": "-1"}, "ima_ml_entry"),
        ({"nonce": "abc", "mask": "0x400", "partial": "1", "ima_ml_entry": "x"}, "ima_ml_entry"),
    ],
)
def test_bad_query_rejected(blank_swtpm: TpmUnderTest, tmp_path: Path, params: dict[str, str],
                            parameter: str) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False) as stack:
        response = stack.get_response(f"{API}/quotes/integrity", **params)

    body = response.json()
    assert response.status_code == 400
    assert body["code"] == 400
    assert parameter in body["status"]
    assert body["results"]["error"]["field"] == parameter


def test_nonce_of_64_characters_accepted(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    nonce = "N" * 64
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False) as stack:
        results = integrity(stack, nonce=nonce, mask="400")
        pcrs = verified_pcrs(stack, results, nonce)

    assert sorted(pcrs) == [10, 16]


def test_unsupported_version_rejected(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False) as stack:
        response = stack.get_response("/v1.0/quotes/identity", nonce="abc")

    assert response.status_code == 400
    assert response.json()["results"]["error"]["code"] == "api-version-unsupported"


def test_unknown_route_in_envelope(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False) as stack:
        response = stack.get_response(f"{API}/quotes/everything")

    assert response.status_code == 404
    assert response.json()["code"] == 404


def test_tpm_failure_gives_500_without_traceback(blank_swtpm: TpmUnderTest, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False) as stack:
        blank_swtpm.swtpm.stop()
        response = stack.get_response(f"{API}/quotes/identity", nonce="abc")

    body = response.json()
    assert response.status_code == 500
    assert body["code"] == 500
    assert body["results"]["error"]["code"] == "tpm-command-failed"
    assert "Traceback" not in response.text
    assert "TPM2_PCR_Reset failed" in body["status"]
    assert any("response code" in record.getMessage() for record in caplog.records)


def test_concurrent_requests_all_verify(blank_swtpm: TpmUnderTest, car: Path, tmp_path: Path) -> None:
    failures: list[str] = []
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car]) as stack:

        def poll(worker: int) -> None:
            session = requests.Session()
            for round_number in range(4):
                nonce = f"w{worker}r{round_number}"
                response = session.get(f"{stack.url}{API}/quotes/integrity", timeout=60,
                                       params={"nonce": nonce, "mask": "0x400", "partial": "1"})
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                results = response.json()["results"]
                pcrs = verified_pcrs(stack, results, nonce)
                entries = parse_ascii_list(results["ima_measurement_list"])
                if replay_pcr10(entries, "sha256") != pcrs[10]:
                    failures.append(f"{nonce}: list does not replay to PCR 10")

        threads = [threading.Thread(target=poll, args=(worker,)) for worker in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    assert failures == []


def test_boot_time_from_proc_stat(tmp_path: Path) -> None:
    proc_stat = tmp_path / "stat"
    proc_stat.write_text("cpu  1 2 3\nbtime 1733300000\nprocesses 5\n")

    assert read_boot_time(proc_stat) == 1733300000
    assert read_boot_time(tmp_path / "missing") is None
