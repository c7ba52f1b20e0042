"""The aggregated API the apiserver proxies users' console and counters requests to
(subresources), its serving certificate, the front proxy's identity it trusts (front_proxy),
and the way to each node's agent (agent_links)."""
