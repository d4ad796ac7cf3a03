"""Synthetic talking heads whose mouth is a documented function of their speech (Ray-free)."""
from .speaker import (FORMULAS_VERSION, SpeakerIdentity, Speech, espeak_phonemes, mouth_track, render_frame,
                      speak)

__all__ = ["FORMULAS_VERSION", "SpeakerIdentity", "Speech", "espeak_phonemes", "mouth_track", "render_frame", "speak"]
