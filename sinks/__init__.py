"""Sinks: GenAI spans and budget signals from Kafka into ClickHouse (docs/ARCHITECTURE.md §11).

`schema` holds the tables and migrations, `clickhouse` the connection and the
batch writer, `consumer` the Kafka consumer (`python -m burnguard.sinks`),
`queries` the read helpers. Importing this package imports nothing heavy.
"""
