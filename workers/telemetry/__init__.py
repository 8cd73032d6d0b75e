"""GPU stats (NVML), queue depth and age, consumer lag, workers → Prometheus and the status snapshot."""
