"""Property tests: malformed IMA lists raise only ParseError; built lists round-trip."""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.errors import ImaParseError, ParseError
from evidence.findings import is_failure
from evidence.ima import (
    ImaReplayState,
    format_ascii_list,
    format_binary_list,
    parse_ascii_list,
    parse_binary_list,
    parse_measurement_list,
    verify_measurement_list,
)
from evidence.ima.ascii import _parse_line
from tests.support.ima import BANK_SIZES, ImaListBuilder, fake_boot_pcrs

# IMA_PROPERTY_EXAMPLES raises the example count for a longer local run.
SETTINGS = settings(
    max_examples=int(os.environ.get("IMA_PROPERTY_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# File names as the kernel can log them: any bytes but NUL, and no newline (which the ASCII
# form cannot carry).
names = st.binary(max_size=120).map(lambda name: name.replace(b"\0", b"").replace(b"\n", b""))
algorithms = st.sampled_from(["sha1", "sha256", "sha384", "sha512"])


@st.composite
def built_lists(draw: st.DrawFn) -> ImaListBuilder:
    built = ImaListBuilder(template_hash_algorithm=draw(algorithms))
    if draw(st.booleans()):
        built.boot_aggregate(fake_boot_pcrs(), bank=draw(algorithms))
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        template = draw(st.sampled_from(["ima", "ima-ng", "ima-sig", "ima-buf", "violation"]))
        name = draw(names)
        content = draw(st.binary(max_size=40))
        algorithm = draw(algorithms)
        if template == "ima":
            built.ima(name[:255], content)
        elif template == "ima-ng":
            built.ima_ng(name, content, algorithm=algorithm, pcr=draw(st.sampled_from([10, 10, 11])))
        elif template == "ima-sig":
            built.ima_sig(name, content, algorithm=algorithm, signature=draw(st.binary(max_size=80)))
        elif template == "ima-buf":
            built.ima_buf(name.decode("utf-8", "surrogateescape"), content, algorithm=algorithm)
        else:
            built.violation(name.decode("utf-8", "surrogateescape"), algorithm=algorithm)
    return built


def _assert_same_entries(parsed: object, built: ImaListBuilder) -> None:
    entries = list(parsed)  # type: ignore[call-overload]
    assert len(entries) == len(built.entries)
    for entry, expected in zip(entries, built.entries, strict=True):
        assert entry.pcr == expected.pcr
        assert entry.template == expected.template
        assert entry.template_hash == expected.template_hash
        assert entry.digest_algorithm == expected.digest_algorithm
        assert entry.digest == expected.digest
        assert entry.path_bytes == expected.name
        assert entry.signature == expected.signature
        assert entry.buffer == expected.buffer
        assert entry.template_data == expected.template_data


@SETTINGS
@given(built_lists())
def test_built_ascii_list_round_trips(built: ImaListBuilder) -> None:
    parsed = parse_ascii_list(built.ascii_bytes())

    _assert_same_entries(parsed, built)
    assert format_ascii_list(parsed.entries).encode("utf-8", "surrogateescape") == built.ascii_bytes()


@SETTINGS
@given(built_lists())
def test_built_binary_list_round_trips(built: ImaListBuilder) -> None:
    parsed = parse_binary_list(built.binary(), template_hash_algorithm=built.template_hash_algorithm)

    _assert_same_entries(parsed, built)
    assert format_binary_list(parsed.entries) == built.binary()


@SETTINGS
@given(built_lists(), st.sampled_from(sorted(BANK_SIZES)))
def test_built_list_verifies_against_builder_pcr10(built: ImaListBuilder, bank: str) -> None:
    parsed = parse_ascii_list(built.ascii_bytes())

    result = verify_measurement_list(parsed, {bank: built.pcr10(bank)})

    assert not is_failure(result.findings)
    assert result.next_state.pcr10[bank] == built.pcr10(bank)


@SETTINGS
@given(built_lists())
def test_fast_and_general_line_parsers_agree(built: ImaListBuilder) -> None:
    size = BANK_SIZES[built.template_hash_algorithm]
    parsed = parse_ascii_list(built.ascii_bytes())

    for entry, line in zip(parsed, built.lines(), strict=True):
        general = _parse_line(line.decode("utf-8", "surrogateescape"), entry.index, size)
        assert general == entry


@SETTINGS
@given(st.text(max_size=300))
def test_random_text_raises_only_parse_error(text: str) -> None:
    try:
        parse_ascii_list(text)
    except ImaParseError:
        pass


def _mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    for position, delete, insert in edits:
        position %= len(data) + 1
        data = data[:position] + insert + data[position + delete :]
    return data


edits = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=10_000),
        st.integers(min_value=0, max_value=4),
        st.sampled_from([b"", b" ", b":", b"\n", b"0", b"f", b"A", b"\0", b"\xff", b"sha1", b"ima-sig"])
        | st.binary(max_size=4),
    ),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(built_lists(), edits)
def test_mutated_ascii_list_raises_only_parse_error(
    built: ImaListBuilder, changes: list[tuple[int, int, bytes]]
) -> None:
    data = _mutate(built.ascii_bytes(), changes)

    try:
        parsed = parse_ascii_list(data)
    except ImaParseError:
        return
    verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")})


@SETTINGS
@given(built_lists(), edits)
def test_mutated_binary_list_raises_only_parse_error(
    built: ImaListBuilder, changes: list[tuple[int, int, bytes]]
) -> None:
    data = _mutate(built.binary(), changes)

    try:
        parsed = parse_binary_list(data)
    except ImaParseError:
        return
    verify_measurement_list(parsed, {"sha1": built.pcr10("sha1")})


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_parse_error(data: bytes) -> None:
    for parse in (parse_binary_list, parse_measurement_list, parse_ascii_list):
        try:
            parse(data)
        except ImaParseError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@SETTINGS
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "next_index": json_values,
            "pcr10": json_values | st.dictionaries(st.sampled_from(["sha1", "sha256", "md5"]), json_values),
            "seen_entries": json_values,
            "lagging_rounds": json_values,
        },
    )
)
def test_malformed_state_raises_only_parse_error(data: dict[str, object]) -> None:
    try:
        ImaReplayState.from_json(json.loads(json.dumps(data)))
    except ParseError as error:
        assert error.code == "ima-state-invalid"


@SETTINGS
@given(
    st.integers(min_value=0, max_value=2**40),
    st.dictionaries(st.sampled_from(sorted(BANK_SIZES)), st.binary(min_size=64, max_size=64)),
    st.integers(min_value=0, max_value=2**40),
    st.integers(min_value=0, max_value=5),
)
def test_state_json_round_trips(next_index: int, values: dict[str, bytes], seen: int, lagging: int) -> None:
    state = ImaReplayState(
        next_index, {bank: value[: BANK_SIZES[bank]] for bank, value in values.items()}, seen, lagging
    )

    assert ImaReplayState.from_json(json.loads(json.dumps(state.to_json()))) == state
