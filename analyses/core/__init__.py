"""Infrastructure shared by the analyses: typed results and configs (base), the results store, input
reading and run state (io), text domains, HTML reports, the memory planner, Ray sweeps (cluster) and
checkpoint sweeps (checkpoints)."""
