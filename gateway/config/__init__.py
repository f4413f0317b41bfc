"""Configuration: the settings table, settings files, the operator's view of them."""
