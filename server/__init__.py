"""traindeck server: the supervised trainer process, the pipe protocol, HTTP/WebSocket and the CLI."""
