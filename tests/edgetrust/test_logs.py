from __future__ import annotations

import logging

import pytest

from edgetrust.logs import FORMAT, configure_logging, device_logger


def test_device_id_on_device_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    log = logging.getLogger("edgetrust.test")

    device_logger(log, "car-7").warning("quote rejected")
    log.info("server started")

    lines = capsys.readouterr().err.strip().splitlines()
    assert "[device=car-7] quote rejected" in lines[-2]
    assert "[device=-] server started" in lines[-1]


def test_extra_device_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")

    logging.getLogger("edgetrust.test").info("enrolled", extra={"device_id": "car-8"})

    assert "[device=car-8] enrolled" in capsys.readouterr().err


def test_unknown_level_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        configure_logging("LOUD")


def test_format_names_device() -> None:
    assert "%(device_id)s" in FORMAT
