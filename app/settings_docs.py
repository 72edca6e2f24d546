"""README.md's settings table and .env.example, generated from the one declaration of every
setting (app/config.py SETTINGS), so the docs cannot drift from what the server reads.

    python -m app.config            print the table, write nothing
    python -m app.config --check    exit 1 if README.md or .env.example is out of date
    python -m app.config --write    rewrite them
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.config import SETTINGS


def settings_table() -> str:
    """The README's settings table, generated from SETTINGS."""
    rows = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default else "(empty)"
        rows.append(f"| `{setting.env_name}` | {default} | {setting.help} |")
    return "\n".join(rows)


def env_example() -> str:
    """.env.example, generated from SETTINGS."""
    lines = [
        "# Devoid Generator settings. Copy to .env; real environment variables win over this file.",
        "# Every line shows the default; a commented line means the default is empty or derived.",
        "",
    ]
    for setting in SETTINGS:
        lines.append(f"# {setting.help}")
        lines.append(f"# {setting.env_name}=" if not setting.default else f"{setting.env_name}={setting.default}")
        lines.append("")
    return "\n".join(lines)


def documented_files(root: Path) -> dict[Path, str]:
    """README.md and .env.example as they should read, with the settings table from SETTINGS."""
    readme = (root / "README.md").read_text()
    start = readme.index("| setting | default | meaning |")
    end = readme.index("\n\n", start)
    return {root / "README.md": readme[:start] + settings_table() + readme[end:], root / ".env.example": env_example()}


def main(argv: list[str]) -> int:
    """Show, check or rewrite the settings docs (`python -m app.config` runs this too)."""
    parser = argparse.ArgumentParser(
        prog="python -m app.config",
        description="The settings table of README.md and .env.example, generated from app/config.py. "
        "Without an option it prints the table and writes nothing.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="exit 1 if README.md or .env.example is out of date")
    action.add_argument("--write", action="store_true", help="rewrite the table in README.md and .env.example")
    args = parser.parse_args(argv)
    files = documented_files(Path(__file__).resolve().parent.parent)
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.name} is out of date: run python -m app.config --write")
        return 1 if stale else 0
    if args.write:
        for path in stale:
            path.write_text(files[path])
            print(f"rewrote {path.name}")
        return 0
    print(settings_table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
