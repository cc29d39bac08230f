"""Data the machine can make offline, as random-access sources and grain batch pipelines.

* `speech`: espeak-ng + sox utterances of random English words in many voices, with transcripts,
  cached on disk and deterministic from a seed; speaker-disjoint train/test split.
* `video`: moving digits from scikit-learn's handwritten `load_digits`.
* `text`: the Python documentation (or any text folder) as byte tokens, split by document.
* `pipeline.make_batches`: per-process sharded, shuffled, checkpointable grain batches.
* `tokenizers`: character, word and byte tokenizers (id 0 is padding / the CTC blank).
"""

from streamzoo.train.data.pipeline import (local_batch_size, make_batches, process_shard,
                                           shard_records)
from streamzoo.train.data.speech import (SpeechCorpus, SpeechCorpusConfig, SpeechExamples,
                                         espeak_available, generate_speech_corpus,
                                         load_speech_corpus, load_vocabulary, pad_speech_batch,
                                         read_wav)
from streamzoo.train.data.text import (TextCorpus, TokenWindows, available_sources,
                                       load_documents, load_text_corpus)
from streamzoo.train.data.tokenizers import PAD, ByteTokenizer, CharTokenizer, WordTokenizer
from streamzoo.train.data.video import MovingDigits, moving_digits

__all__ = [
    "PAD", "ByteTokenizer", "CharTokenizer", "MovingDigits", "SpeechCorpus", "SpeechCorpusConfig",
    "SpeechExamples", "TextCorpus", "TokenWindows", "WordTokenizer", "available_sources",
    "espeak_available", "generate_speech_corpus", "load_documents", "load_speech_corpus",
    "load_text_corpus", "load_vocabulary", "local_batch_size", "make_batches", "moving_digits",
    "pad_speech_batch", "process_shard", "read_wav", "shard_records",
]
