"""The ``sluice`` command: serve, the supervisor and its workers, admin and spool tools."""
