"""docs/ARCHITECTURE.md is in the repository and every design reference in the code points
at a section it has; the contracts it describes name the fields the code writes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def test_every_design_reference_in_the_code_points_into_the_architecture_doc():
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", DOC.read_text(), flags=re.M)}
    assert sections == set(range(1, 11))
    cited, stale = set(), []
    for path in [*ROOT.glob("attribution_core/**/*.py"), *ROOT.glob("pipelines/**/*.py")]:
        text = path.read_text()
        cited |= {int(n) for n in re.findall(r"ARCHITECTURE §(\d+)", text)}
        stale += [f"{path.relative_to(ROOT)}: DESIGN {n}" for n in re.findall(r"\bDESIGN (\d+)", text)]
    assert stale == [], "design references to a document that is not in the repository"
    assert cited and cited <= sections
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text()


def test_the_contracts_name_the_fields_the_code_writes():
    from attribution_core.index.manifest import IndexManifest, ModelRecord
    from attribution_core.index.schema import KEY_COLUMNS, METADATA, ROW_SCALE

    doc = DOC.read_text()
    written = IndexManifest(version="v1", sequence=1, model=ModelRecord("f"), featurize={}, layout={"groups": []},
                            dtype="float16", dataset={}, shards=()).to_json()
    keys = set(written)
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert missing == [], "manifest keys the architecture document does not describe"
    assert all(f"`{c}`" in doc for c in (*KEY_COLUMNS, METADATA, ROW_SCALE))
