"""What the agent serves over HTTP: consoles and counters to the controller (mutual TLS), health
on its public port, and the replaced service's endpoints on loopback."""
