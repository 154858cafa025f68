//! Traffic capture: the pure iptables rule plan for a sidecar pod and its executor.
