"""sidcore: Score identity Distillation (SiD, SiDA, SiD²A) of EDM / EDM2 teachers into one-step generators."""

__version__ = "0.1.0"
