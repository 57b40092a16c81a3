"""The JSON schema of telepresence.yaml kept in ``.tpconf/`` for editors.

The file ``tpconf init`` writes points yaml-language-server at it; ``tpconf up`` writes it again
whenever the installed tpconf's schema differs, so the editor's completion follows upgrades.
"""

from __future__ import annotations

import os
from pathlib import Path

from tpconf.config.schema import schema_text
from tpconf.methods import REGISTRY

#: Where the schema is kept, relative to the project directory.
SCHEMA_COPY = ".tpconf/telepresence.schema.json"


def write_schema(project_dir: Path) -> Path:
    """Write the schema to :data:`SCHEMA_COPY` unless it is there already, unchanged."""
    target = project_dir / SCHEMA_COPY
    text = schema_text(REGISTRY)
    try:
        if target.read_text(encoding="utf-8") == text:
            return target
    except OSError:
        pass
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(target)
    return target
