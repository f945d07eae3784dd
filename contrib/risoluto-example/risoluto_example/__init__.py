"""risoluto-example: the plugin built in docs/writing-plugins.md."""
