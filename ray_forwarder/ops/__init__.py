"""Operations: the metric catalogue, Prometheus export, HTTP endpoints, logs."""
