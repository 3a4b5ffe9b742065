from collections.abc import Sequence
from typing import Any

from evidence.ima.entry import ImaEntry

def parse_ima_ng(
    data: str | bytes,
    position: int,
    first_index: int,
    template_hash_size: int,
    entry_type: type[ImaEntry],
    template: str,
    d_ng_table: tuple[tuple[bytes, bytes, int, str], ...],
    entries: list[ImaEntry],
) -> int: ...
def replay(
    entries: Sequence[ImaEntry],
    entry_type: type[ImaEntry],
    bank: str,
    initial: bytes,
    quoted: bytes | None,
    check_algorithm: str | None,
    parallel_from: int = ...,
) -> tuple[list[int], bytes, list[ImaEntry], list[int], list[int], list[ImaEntry]] | None: ...
def unlisted_entries(
    entries: Sequence[object],
    entry_type: type[ImaEntry],
    digests: dict[str, object],
    zero_hashes: frozenset[bytes],
    boot_aggregate_name: str | None,
) -> list[Any]: ...
def entries_tuple(entries: list[ImaEntry]) -> tuple[ImaEntry, ...]: ...
