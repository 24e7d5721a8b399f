"""TFRecord framing (`graddiag._records`): known CRC values, TensorBoard's reader, damaged input."""

import struct

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

from graddiag._records import FOOTER_SIZE, HEADER_SIZE, frame, masked_crc32c, scan

# CRC-32C("123456789") is the standard check value 0xE3069283 (RFC 3720, appendix B.4).
# Masking rotates it right by 15 bits: 0x2507C60D, then adds 0xA282EAD8: 0xC78AB0E5.
CHECK_INPUT = b"123456789"
CHECK_MASKED = 0xC78AB0E5


def test_masked_crc_of_the_check_input_by_hand():
    assert masked_crc32c(CHECK_INPUT) == CHECK_MASKED


def test_masked_crc_of_nothing_is_the_mask_constant():
    assert masked_crc32c(b"") == 0xA282EAD8  # CRC-32C of no bytes is 0


def test_frame_layout_byte_by_byte():
    rec = frame(CHECK_INPUT)
    assert len(rec) == HEADER_SIZE + len(CHECK_INPUT) + FOOTER_SIZE == 12 + 9 + 4
    assert rec[:8] == b"\x09\0\0\0\0\0\0\0"  # length 9, uint64 little-endian
    assert rec[8:12] == struct.pack("<I", masked_crc32c(rec[:8]))
    assert rec[12:21] == CHECK_INPUT
    assert rec[21:] == struct.pack("<I", CHECK_MASKED)


def test_framed_records_read_back_by_tensorboard(tmp_path):
    payloads = [b"", b"x", CHECK_INPUT, bytes(range(256)) * 40]
    path = tmp_path / "events.out.tfevents.0.test"
    path.write_bytes(b"".join(frame(p) for p in payloads))
    assert list(RawEventFileLoader(str(path)).Load()) == payloads


def test_scan_finds_every_record():
    payloads = [b"a", b"", b"bcd" * 100]
    buf = b"".join(frame(p) for p in payloads)
    records, end, corrupt, _, resyncing = scan(buf)
    assert [buf[s:e] for s, e in records] == payloads
    assert (end, corrupt, resyncing) == (len(buf), 0, False)


def test_scan_skips_and_counts_a_record_with_a_bad_data_crc():
    bad = bytearray(frame(b"hello"))
    bad[HEADER_SIZE] ^= 0xFF  # flip the first data byte
    buf = frame(b"one") + bytes(bad) + frame(b"two")
    records, end, corrupt, _, _ = scan(buf)
    assert [buf[s:e] for s, e in records] == [b"one", b"two"]
    assert (end, corrupt) == (len(buf), 1)


def test_scan_resyncs_after_a_bad_length_counting_one_corrupt_stretch():
    bad = bytearray(frame(b"hello"))
    bad[0] ^= 0xFF  # the length no longer matches its CRC
    buf = frame(b"one") + bytes(bad) + frame(b"two")
    records, end, corrupt, _, resyncing = scan(buf)
    assert [buf[s:e] for s, e in records] == [b"one", b"two"]
    assert (end, corrupt, resyncing) == (len(buf), 1, False)


def test_scan_stops_at_an_incomplete_record():
    whole = frame(b"one")
    buf = whole + frame(b"two")[:-1]
    records, end, corrupt, _, _ = scan(buf)
    assert [buf[s:e] for s, e in records] == [b"one"]
    assert (end, corrupt) == (len(whole), 0)
