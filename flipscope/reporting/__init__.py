"""Figures (plotly, data in and figure out), the self-contained report page, and the demo pipeline."""
