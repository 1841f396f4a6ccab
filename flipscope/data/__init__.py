"""Data in and out: questions, the resumable result store, FlipBanks and their curation.

Nothing here runs a model or imports torch."""
