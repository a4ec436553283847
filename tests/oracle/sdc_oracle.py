"""The SDC lab's bit flips (reference/sdc.h, store_and_flip) against PyTorch's and NumPy's own bits.

    /usr/bin/python3 tests/oracle/sdc_oracle.py CASES_DIR               # every case
    /usr/bin/python3 tests/oracle/sdc_oracle.py --self-test CASES_DIR   # ... and it fails wrong flips

CASES_DIR is written by moelab_dump_sdc_cases: per format (fp32, bf16, fp16), rows of
[value as float32 bits, bit, stored bits, faulted bits, faulted value as float32 bits]. For each row
the value is converted here by the frameworks (np.float32; torch's float32 -> bfloat16, which rounds
to nearest even; np.float16, the same), viewed as an integer of the format's width
(ndarray.view(np.uint32 / np.uint16), tensor.view(torch.int16)), XORed with 1 << bit, viewed back
as the format and widened to float32. moelab's stored pattern, faulted pattern and faulted value
must be those bits exactly. Exit code 1 if any row differs, 77 if torch cannot be imported.
"""
import json
import pathlib
import sys

try:
    import numpy as np
    import torch
except ImportError as error:  # pragma: no cover
    print(f"sdc_oracle: SKIP: cannot import torch/numpy ({error!r}); run it with Debian's /usr/bin/python3 "
          "(python3-torch)")
    sys.exit(77)


def f32_from_bits(bits):
    return np.array([bits], dtype=np.uint32).view(np.float32)


def flip_fp32(value_bits, bit):
    stored = int(f32_from_bits(value_bits).view(np.uint32)[0])
    faulted = stored ^ (1 << bit)
    return stored, faulted, faulted


def flip_bf16(value_bits, bit):
    t = torch.from_numpy(f32_from_bits(value_bits)).to(torch.bfloat16)
    stored = int(t.view(torch.int16).item()) & 0xFFFF
    faulted = stored ^ (1 << bit)
    as_int16 = faulted - 0x10000 if faulted >= 0x8000 else faulted
    widened = torch.tensor([as_int16], dtype=torch.int16).view(torch.bfloat16).to(torch.float32)
    return stored, faulted, int(widened.view(torch.int32).item()) & 0xFFFFFFFF


def flip_fp16(value_bits, bit):
    stored = int(f32_from_bits(value_bits).astype(np.float16).view(np.uint16)[0])
    faulted = stored ^ (1 << bit)
    widened = np.array([faulted], dtype=np.uint16).view(np.float16).astype(np.float32)
    return stored, faulted, int(widened.view(np.uint32)[0])


FLIPS = {"fp32": flip_fp32, "bf16": flip_bf16, "fp16": flip_fp16}


def check(case):
    """The rows of a case that disagree with the frameworks, as messages."""
    flip = FLIPS[case["format"]]
    wrong = []
    for value_bits, bit, stored, faulted, faulted_f32 in case["rows"]:
        expected = flip(value_bits, bit)
        got = (stored, faulted, faulted_f32)
        if got != expected:
            wrong.append(f"value {value_bits:#010x} bit {bit}: moelab (stored, faulted, as f32) = "
                         f"({stored:#x}, {faulted:#x}, {faulted_f32:#010x}), frameworks ({expected[0]:#x}, "
                         f"{expected[1]:#x}, {expected[2]:#010x})")
    return wrong


def mutations(case):
    """Small corruptions of moelab's rows, each of which check() must catch."""
    for i in range(0, len(case["rows"]), 97):
        for column, change in ((2, 1), (3, 2), (3, 1 << 0), (4, 1)):
            bad = json.loads(json.dumps(case))
            bad["rows"][i][column] ^= change
            yield f"row {i} column {column} ^ {change}", bad


def main(argv):
    self_test = "--self-test" in argv
    paths = [a for a in argv if a != "--self-test"]
    if len(paths) != 1:
        print(__doc__)
        return 2
    root = pathlib.Path(paths[0])
    files = [root / name for name in json.loads((root / "manifest.json").read_text())["cases"]]
    failed = 0
    for path in files:
        case = json.loads(path.read_text())
        wrong = check(case)
        if self_test:
            missed = [name for name, bad in mutations(case) if not check(bad)] if not wrong else []
            status = "FAIL" if wrong or missed else "PASS"
            print(f"{status} {path.name}: {sum(1 for _ in mutations(case))} mutations, {len(missed)} missed"
                  + (f" ({missed[:3]})" if missed else ""))
            failed += 1 if wrong or missed else 0
        else:
            print(f"{'FAIL' if wrong else 'PASS'} {path.name}: {len(case['rows'])} flips"
                  + (f"; {len(wrong)} differ, first: {wrong[0]}" if wrong else ""))
            failed += 1 if wrong else 0
    print(f"{len(files) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
