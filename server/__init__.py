"""The study coordinator's side: CareFed's ServerApp, aggregation, and the run folder."""
