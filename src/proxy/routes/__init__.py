"""HTTP routes of the proxy, one module per concern."""
