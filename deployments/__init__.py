"""The deployment core: what every front end (CLI, bot, monitor) calls to act on the homelab."""
