"""Default plugins: the data-plane role (``risoluto serve --data-plane``). See docs/data-plane.md."""
