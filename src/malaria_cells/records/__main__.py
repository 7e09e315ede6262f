"""``python -m malaria_cells.records upgrade|current [URL]`` and ``new MESSAGE``: the schema by hand.

``upgrade`` brings a database to the newest migration (``screen --db``, ``serve --db`` and
:func:`~malaria_cells.records.open_records` do so themselves; this is for an administrator
who upgrades a shared PostgreSQL database on purpose). ``current`` prints the database's
schema revision and the newest this malaria-cells knows. ``new`` is for a developer who has
changed :mod:`~malaria_cells.records.schema`: it writes the next migration (Alembic's
autogenerate, against a scratch SQLite database at the newest revision) into
``migrations/versions/``, to be read, adjusted and tested before it is committed.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MalariaCellsError
from .store import DB_ENV, DEFAULT_URL, MIGRATIONS, open_records, schema_revision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m malaria_cells.records", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("upgrade", "current", "new"))
    parser.add_argument("argument", nargs="?", metavar="URL|MESSAGE",
                        help=f"upgrade, current: the database (default: ${DB_ENV}, else {DEFAULT_URL}); "
                        "new: what the migration does, in a few words")
    args = parser.parse_args(argv)
    try:
        if args.step == "upgrade":
            open_records(args.argument).close()
            current, _ = schema_revision(args.argument)
            print(f"schema at revision {current} (the newest)")
        elif args.step == "current":
            current, head = schema_revision(args.argument)
            print(f"schema revision {current or 'none (an empty database)'}; this malaria-cells knows up to {head}")
        else:
            print(f"wrote {new_migration(args.argument)}")
    except MalariaCellsError as error:
        print(f"python -m malaria_cells.records {args.step}: error: {error}", file=sys.stderr)
        return 2
    return 0


def new_migration(message: str | None) -> str:
    """Autogenerate the next migration from the difference between the schema classes and the
    newest migration; returns the new file's path."""
    import tempfile
    from pathlib import Path

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    if not message or not message.strip():
        raise MalariaCellsError("new: say what the migration does (python -m malaria_cells.records new 'reviews')")
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'scratch.db'}"
        open_records(url).close()
        _, head = schema_revision(url)
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        engine = create_engine(url)
        try:
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                script = command.revision(config, message.strip(), autogenerate=True, rev_id=f"{int(head) + 1:04d}")
        finally:
            engine.dispose()
    return script.path


if __name__ == "__main__":
    sys.exit(main())
