"""The compiled policy cache: one object per policy content, shared by every device."""

from __future__ import annotations

import gc
import hashlib
import json
import threading
import tracemalloc

import pytest

from policies.runtime import PolicyCache, cached_runtime_policy, empty_policy_document, load_runtime_policy


def policy_text(paths: int, *, seed: str = "") -> str:
    document = empty_policy_document()
    document["digests"] = {
        f"/usr/lib/{seed}file{i:06d}.so": [hashlib.sha256(f"{seed}{i}".encode()).hexdigest()]
        for i in range(paths)
    }
    return json.dumps(document)


def test_same_text_returns_same_object() -> None:
    cache = PolicyCache()
    text = policy_text(10)

    assert load_runtime_policy(text, cache=cache) is load_runtime_policy(text.encode(), cache=cache)
    assert len(cache) == 1


def test_reformatted_text_shares_object_by_content_hash() -> None:
    cache = PolicyCache()
    text = policy_text(10)

    first = load_runtime_policy(text, cache=cache)
    second = load_runtime_policy(json.dumps(json.loads(text), indent=4, sort_keys=True), cache=cache)

    assert second is first
    assert cache.get(first.content_hash) is first


def test_lookup_by_content_hash() -> None:
    cache = PolicyCache()
    policy = load_runtime_policy(policy_text(3), cache=cache)

    assert cached_runtime_policy(policy.content_hash, cache=cache) is policy
    assert cached_runtime_policy("0" * 64, cache=cache) is None


def test_cache_is_bounded_and_least_recently_used() -> None:
    cache = PolicyCache(max_size=2)
    first = load_runtime_policy(policy_text(2, seed="a"), cache=cache)
    second = load_runtime_policy(policy_text(2, seed="b"), cache=cache)
    assert cache.get(first.content_hash) is first

    third = load_runtime_policy(policy_text(2, seed="c"), cache=cache)

    assert len(cache) == 2
    assert cache.get(second.content_hash) is None
    assert cache.get(first.content_hash) is first
    assert cache.get(third.content_hash) is third


def test_cache_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PolicyCache(max_size=0)


def test_threads_loading_one_policy_share_one_object() -> None:
    cache = PolicyCache()
    text = policy_text(2000)
    results: list[object] = []

    def load() -> None:
        results.append(load_runtime_policy(text, cache=cache))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({id(result) for result in results}) == 1


def test_hundred_devices_do_not_grow_memory() -> None:
    # Big policies: 100 devices that reference one policy hold one parsed copy between them.
    cache = PolicyCache()
    text = policy_text(20_000)
    devices = {"device-0": load_runtime_policy(text, cache=cache)}
    gc.collect()

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(1, 100):
            devices[f"device-{number}"] = load_runtime_policy(text, cache=cache)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert len({id(policy) for policy in devices.values()}) == 1
    # One parsed copy of this policy takes several MiB; 99 more references must stay far below.
    assert grown < 256 * 1024


def test_policy_tables_are_read_only() -> None:
    policy = load_runtime_policy(policy_text(1), cache=PolicyCache())

    with pytest.raises(TypeError):
        policy.digests["/evil"] = b"\x00" * 32  # type: ignore[index]
