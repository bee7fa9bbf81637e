"""probewatch — the application: configuration, the command line, and the wiring of
ingest → detectors → storage → alerting into one streaming job."""

__version__ = "0.1.0"
