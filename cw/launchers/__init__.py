"""Launchers: pools of workers on batch systems, and the local cluster."""
