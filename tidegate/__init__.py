"""Operator tooling on top of producers/, workers/ and resilience/: the CLI, the downstream
simulator, the exporter and the status page."""
