"""Feature detectors for FID / IS that are not shipped with torch-fidelity."""
