"""Sinks: GenAI spans and budget signals from Kafka into ClickHouse (docs/ARCHITECTURE.md §11).

`schema` holds the tables and migrations, `clickhouse` the connection and the
batch writer, `consumer` the sink's batch, insert and commit policy,
`membership` its Kafka group membership (kafka-python and its workarounds),
`__main__` the command line (`python -m burnguard.sinks`, `burnguard sink`),
`queries` the read helpers. Importing this package imports nothing heavy.
"""
