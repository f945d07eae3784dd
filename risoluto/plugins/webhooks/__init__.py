"""Default plugins: webhooks."""
