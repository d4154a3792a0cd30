"""docs/settings.md's table lists every `NORMSERVE_*` setting of `service/settings.py`, and nothing
that is not one; the README's short table names only real settings."""

from __future__ import annotations

import re
from pathlib import Path

from normserve.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "settings.md"


def settings_table(text: str) -> set[str]:
    """The variables named in the first column of the table under the README's `## Settings`."""
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0] if "\n## Settings\n" in text else text
    names: set[str] = set()
    for row in section.splitlines():
        if row.startswith("| `NORMSERVE_"):
            names.update(re.findall(r"`(NORMSERVE_[A-Z0-9_]+)`", row.split(" | ")[0]))
    return names


def test_the_settings_table_is_the_settings_class() -> None:
    prefix = Settings.model_config.get("env_prefix", "")
    assert prefix == "NORMSERVE_"
    fields = {prefix + name.upper() for name in Settings.model_fields}
    table = settings_table(REFERENCE.read_text(encoding="utf-8"))
    assert sorted(fields - table) == [], "settings missing from docs/settings.md"
    assert sorted(table - fields) == [], "docs/settings.md names variables that are not settings"
    short = settings_table(README.read_text(encoding="utf-8"))
    assert short and sorted(short - fields) == [], "the README's table names variables that are not settings"


def test_the_table_parser_sees_a_row(tmp_path: Path) -> None:
    text = "# x\n\n## Settings\n\n| variable | default |\n|---|---|\n| `NORMSERVE_A` / `NORMSERVE_B` | `NORMSERVE_C` |\n\n## Next\n| `NORMSERVE_D` | |\n"
    assert settings_table(text) == {"NORMSERVE_A", "NORMSERVE_B"}
