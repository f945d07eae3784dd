"""Default plugins: http."""
