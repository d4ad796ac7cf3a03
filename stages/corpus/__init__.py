"""Training corpus preparation (Ray-free): per-chunk frames, motion and audio, and the corpus card."""
