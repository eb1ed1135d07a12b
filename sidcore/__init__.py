"""sidcore: Score identity Distillation (SiD, SiDA, SiD²A) of EDM / EDM2 teachers into one-step generators."""

__version__ = "0.1.0"

# Exit status of a command that a stop signal (SIGUSR2 / SIGTERM) ended after it saved its state: run it
# again to resume. The distillation loop returns it; the launcher requeues on it.
REQUEUE_EXIT = 3
