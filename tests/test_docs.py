"""Generated documents stay in step with the code."""


def test_docs_openapi_is_current():
    from pathlib import Path

    from service.openapi import document

    committed = Path(__file__).parent.parent / "docs" / "openapi.json"
    assert committed.read_text() == document(), "docs/openapi.json is stale: run `make docs`"
