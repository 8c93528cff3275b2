"""Running CareFed studies on one machine: the `carefed` CLI, scenario files, sweeps and benchmarks."""
