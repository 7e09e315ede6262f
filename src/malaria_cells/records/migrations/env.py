"""Alembic's environment for the records database: run on the connection the caller opened.

:func:`malaria_cells.records.store.upgrade_schema` opens that connection (inside a transaction
that holds the database's write lock) and passes it as ``config.attributes["connection"]``;
the migrations are never run from a URL of their own, so they see exactly the engine settings
(SQLite's WAL mode and foreign keys) that the records use.
"""

from alembic import context

from malaria_cells.records.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the records' migrations through malaria_cells.records (python -m malaria_cells.records "
                       "upgrade URL), which opens the connection they run on")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
