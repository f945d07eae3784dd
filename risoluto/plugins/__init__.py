"""Default plugins, one module per checklist item, grouped by concern."""
