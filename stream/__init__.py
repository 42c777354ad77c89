"""The stream job: OTLP spans from Kafka -> windowed budgets -> signals (needs the `stream` extra)."""
