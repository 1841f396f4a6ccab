"""The paper's protocol, stage by stage: evaluation and its summaries, pair activations,
discovery (statistics, attribution, DiffMean baselines), patching and its sweeps, clamping."""
