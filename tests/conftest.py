pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.pipeline",
    "tests.fixtures.decoders",
    "tests.fixtures.sums",
    "tests.fixtures.wheel",
]
