"""Alembic environment: dynvm runs migrations itself at start-up, on the connection it
passes in ``config.attributes['connection']``."""

from alembic import context

from dynvm.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
