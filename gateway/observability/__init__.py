"""What operators see: log lines, Prometheus metrics, request observation and graceful drain."""
