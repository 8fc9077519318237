"""Opt-in test group: the conformance suite run on other projects' real, installed losses.

Set up with ``bash tools/setup_peers.sh`` (venv ``.venv-peers``), run with
``.venv-peers/bin/python -m pytest -m peers tests/peers``.
"""
