"""Database: column types, SQLModel tables, engines, migrations and repositories."""
