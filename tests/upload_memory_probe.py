"""Run in a fresh process: validate one dataset file with inspect_dataset_file and print, as JSON, how
far the resident set grew above what the process held right before validating.

    python tests/upload_memory_probe.py DATASET [--warm-up SMALL_DATASET] [--module FILE] [--resize WxH]

--warm-up validates a tiny dataset first, so lazily imported codecs and plugins are not counted as
the dataset's. --module loads inspect_dataset_file from an earlier, single-file dataset_files.py (e.g. an
older version taken with `git show`), imported as a module of core.engine so its relative imports
resolve. A refused dataset is reported too, with its error.
Linux only: the peak is /proc/self/status VmHWM, reset to the current RSS through /proc/self/clear_refs
right before validation, so the imports' own peak cannot hide the validation's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.engine.errors import DatasetError


def status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def load_module(file: str | None):
    if file is None:
        import core.engine.dataset_files as module

        return module
    spec = importlib.util.spec_from_file_location("core.engine._dataset_files_under_test", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--warm-up")
    parser.add_argument("--module")
    parser.add_argument("--resize")
    args = parser.parse_args()
    module = load_module(args.module)
    options = {}
    if args.resize:
        width, height = (int(v) for v in args.resize.split("x"))
        options["resize"] = (height, width)
    if args.warm_up:
        module.inspect_dataset_file(Path(args.warm_up), **options)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = status_kib("VmRSS")
    try:
        outcome = {"summary": module.inspect_dataset_file(Path(args.dataset), **options)}
    except DatasetError as err:
        outcome = {"error": str(err)}
    peak = status_kib("VmHWM")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "growth_kib": peak - baseline, **outcome}))


if __name__ == "__main__":
    main()
