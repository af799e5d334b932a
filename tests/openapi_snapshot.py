"""The HTTP API's OpenAPI document as `build_api()` makes it (no Ray, no config), and its stored copy
tests/data/openapi.json, which tests/unit/test_openapi.py compares it with: a route, a status or a
field that changes shows up as a diff in review, never by accident.

After an intended change, regenerate the copy and commit it with the change:

    python -m tests.openapi_snapshot
"""

import json
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "data" / "openapi.json"
REGENERATE = "python -m tests.openapi_snapshot"


def current() -> str:
    """Today's document: keys sorted and indented, so that its diffs read line by line."""
    from serve_app.api.app import build_api

    return json.dumps(build_api().openapi(), sort_keys=True, indent=2) + "\n"


def main() -> None:
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(current())
    print(f"wrote {SNAPSHOT}")


if __name__ == "__main__":
    main()
