"""Stage 4: per-feature statistics, top and interval examples, neighbours and thumbnails into the database."""
