"""GPU stats (NVML), queue depth and consumer lag, workers → Prometheus."""
