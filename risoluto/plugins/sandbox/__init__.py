"""Default plugins: sandbox."""
