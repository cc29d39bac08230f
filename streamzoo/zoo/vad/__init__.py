"""Voice activity detection: Silero VAD v6 (16 kHz) ported with its real weights, and speech
segments from its per-chunk probabilities (`streamzoo demo vad` shows both)."""

from streamzoo.zoo.vad.segments import Segment, SegmentConfig, SegmentTracker, speech_segments
from streamzoo.zoo.vad.silero import SileroVAD, SileroVADCarry, wheel_data_dir

__all__ = ["Segment", "SegmentConfig", "SegmentTracker", "SileroVAD", "SileroVADCarry",
           "speech_segments", "wheel_data_dir"]
