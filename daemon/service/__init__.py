"""The running daemon: lifecycle, the enforcer's I/O shell, audit trail, metrics, ops endpoints, systemd, logs."""
