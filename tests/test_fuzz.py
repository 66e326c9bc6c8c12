"""Hostile bytes: whatever a file holds, the decoders raise only cxrlearn's own DataError (a few seconds here;
benchmarks/fuzz_decoders.py runs the same for minutes)."""

from __future__ import annotations

from fuzzing import fuzz, seed_files


def test_decoders_raise_only_cxrlearns_error_on_mutated_files(sample_images):
    files = seed_files(sorted(sample_images.glob("*.png"))[0])
    # Seed 2 reaches a DICOM with a bad value length (pydicom's BytesLengthException) at case 249, which
    # escaped the decoder before it wrapped every decoder failure in DataError.
    counts = fuzz(files, seed=2, per_format=260)
    assert counts["cases"] == 260 * len(files)
    # The mutants are a real mix: some still decode, many are refused.
    assert counts["decoded"] > 20 and counts["refused"] > 20, counts
