"""The node's filesystem and host tools, below both the agent and the image import: paths that
never leave their base directory, files written whole or not at all, and the one qemu-img runner."""
