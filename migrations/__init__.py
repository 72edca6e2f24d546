"""The schema of the SQLite database: numbered SQL files, applied in order by
app/migrations.py. A package so that the files are installed with the server."""
