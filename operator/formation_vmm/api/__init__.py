"""The Kubernetes API of Formation VMM: names, and typed models of the custom resources."""
