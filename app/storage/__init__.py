"""Where requests and images are kept: the SQLite store (the source of truth), its
migrations, and the image files."""
