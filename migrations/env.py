"""Alembic environment: one URL, from the caller's config, `-x url=...` or CBIR_DB_URL."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from indexer.catalog import Base, make_engine

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

DEFAULT_URL = "sqlite:///index/catalog.sqlite"


def _url() -> str:
    return (context.get_x_argument(as_dictionary=True).get("url")
            or config.get_main_option("sqlalchemy.url")
            or os.environ.get("CBIR_DB_URL")
            or DEFAULT_URL)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        # batch mode: SQLite cannot ALTER most things in place; Alembic copies the table.
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
