"""Default plugins: egress."""
