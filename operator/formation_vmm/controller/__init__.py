"""The cluster controller: places VMs on hypervisor nodes (binding/), moves them when they
must leave one (moves/), serves the aggregated API users' consoles and counters go through
(serving/), seals Secrets for the nodes that need them (sealer), guards images in use
(image_guard) and watches node health; the process's informers and handlers wire it."""
