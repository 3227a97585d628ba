"""The `nixmox` command line: `cli.main` holds the group; each other module one concern."""
