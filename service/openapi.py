"""Write the service's OpenAPI document: ``python -m service.openapi docs/openapi.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .app import create_app
from .config import Settings


def document() -> str:
    return json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(document())
    else:
        sys.stdout.write(document())
