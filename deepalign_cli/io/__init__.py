"""File formats and the project directory. Everything that touches the disk lives here."""
