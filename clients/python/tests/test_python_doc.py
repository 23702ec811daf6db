"""docs/python.md's keyed example runs as written against the real server: its ```python block
under "### Keyed limiters", executed with the `fg` of the other tests and the names the
document imports, the limiters renamed to names unique to this run (the server is shared by
the session's tests). It once scheduled on a limiter without a rate, which the server refuses.
"""

import re
import uuid
from typing import Any, Dict

from conftest import REPO_ROOT
from floodgate import Floodgate, Rate

DOC = REPO_ROOT / "docs" / "python.md"


def _python_block_under(heading: str) -> str:
    text = DOC.read_text()
    at = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[at:], re.S)
    assert match, "no ```python block under " + heading
    return match.group(1)


def test_the_keyed_example_runs_as_written(fg: Floodgate) -> None:
    code = _python_block_under("### Keyed limiters")
    run = uuid.uuid4().hex[:8]
    for name in ("orgs", "org-pace"):
        assert '"{}"'.format(name) in code, name
        code = code.replace('"{}"'.format(name), '"{}-{}"'.format(name, run))
    scope: Dict[str, Any] = {"fg": fg, "Rate": Rate}
    exec(compile(code, str(DOC), "exec"), scope)
    offsets = scope["offsets"]
    assert len(offsets) == 100
    assert offsets == sorted(offsets)
    keyed = fg.limiter("orgs-" + run)["keyed"]
    assert keyed["per_key"]["concurrency"] == 5
    assert keyed["overrides"] == 1
