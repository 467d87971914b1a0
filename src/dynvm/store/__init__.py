"""dynvm's own database: leases, reservations and VM history (SQLite or PostgreSQL)."""
