"""`python -m burnguard.stream`: run one worker of the budget job (configured from env)."""

from burnguard.stream.app import run_worker

if __name__ == "__main__":
    run_worker()
