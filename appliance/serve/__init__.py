"""Ray Serve deployments, the application builder and the serving lifecycle."""
