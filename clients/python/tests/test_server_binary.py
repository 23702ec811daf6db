"""The tests run the server cargo builds (README: "the server built with cargo if needed"): the
binary is looked for under the target directory cargo reports, so with `CARGO_TARGET_DIR` set
the tests no longer run a stale `target/debug/floodgate`, or fail on a missing one."""

import shutil
from pathlib import Path

import pytest

from conftest import cargo_binary


def test_the_server_binary_is_looked_for_where_cargo_builds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not on PATH: target/debug/floodgate is the only place to look")
    monkeypatch.setenv("CARGO_TARGET_DIR", str(tmp_path))
    assert cargo_binary() == tmp_path / "debug" / "floodgate"
