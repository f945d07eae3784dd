"""Default plugins: secrets."""
