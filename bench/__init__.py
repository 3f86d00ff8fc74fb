"""`arus bench`: benchmarks of every stage of the pipeline and of the whole, on this machine.

bench.run      the orchestrator (`arus bench [--out FILE] [--only STAGES] [--quick] ...`)
bench.stages   one function per stage: transport, gateway, worker, sink, e2e, latency, window_state
bench.stack    the embedded services and the processes started for a stage (all stopped on exit)
bench.loadgen  load generators, run as separate processes (`python -m bench.loadgen MODE SPEC OUT`)
bench.data     deterministic, realistic Jember devices, payloads, envelopes and telemetry messages
bench.stats    pure maths and reporting: percentiles, steady-state rates, ratios to the bars, JSON shape
bench.profile  py-spy collapsed stacks -> where the time goes (self and total share per function)
"""
