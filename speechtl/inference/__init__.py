"""Using a trained model: :class:`Recognizer`, batch decoding and scoring, long-audio
transcription and subtitles, and Whisper zero-shot baselines."""
