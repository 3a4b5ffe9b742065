"""Helpers that tests share: real swtpm processes, EK certificate authorities, servers."""
