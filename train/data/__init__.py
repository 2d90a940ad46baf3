"""Training data: metadata files, video and image decoding, aspect-ratio buckets, samplers."""
