"""The OpenAPI document is what tests/data/openapi.json says: no route, status or schema changes
unseen. After an intended change, `python -m tests.openapi_snapshot` regenerates the copy."""

import difflib

import pytest

from tests.openapi_snapshot import REGENERATE, SNAPSHOT, current

SHOWN_LINES = 60  # of the diff, in the failure message


def test_the_openapi_document_matches_its_stored_copy():
    stored, now = SNAPSHOT.read_text(), current()
    if now != stored:
        diff = list(difflib.unified_diff(stored.splitlines(), now.splitlines(), "tests/data/openapi.json",
                                         "build_api().openapi()", lineterm="", n=2))
        more = f"\n... and {len(diff) - SHOWN_LINES} more lines" if len(diff) > SHOWN_LINES else ""
        pytest.fail(f"The OpenAPI document differs from its stored copy. If the change is intended, run "
                    f"`{REGENERATE}` and commit tests/data/openapi.json with it.\n"
                    + "\n".join(diff[:SHOWN_LINES]) + more, pytrace=False)
