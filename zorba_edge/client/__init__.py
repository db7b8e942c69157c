"""The edge client: device profiling, the local trainer and the daemon that talks to the server."""
