"""`selfcorrect export`: a stored run written out, one record per turn (per scoring pass for the exact estimator),
as JSON lines, JSON, CSV, the log lines of Yang et al.'s scripts (paper_logs.py) or an Inspect AI eval log
(inspect_ext/log_export.py)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from .api import load_run
from .errors import UserError
from .files import check_output_file, write_atomically

EXPORT_FORMATS = ("jsonl", "json", "csv", "yang2025", "inspect")


def write_export(run_id: str, format: str, output: Path | None, db: str | Path | None = None) -> None:
    """Write run `run_id` in `format` to the file `output` (standard output when None). Everything is built
    before the file is opened, so a failure writes nothing."""
    if format not in EXPORT_FORMATS:
        raise UserError(f"--format {format}: choose one of {', '.join(EXPORT_FORMATS)}")
    if output is not None:
        check_output_file(output, "--output")
    if format == "inspect" and output is None:
        raise UserError("--format inspect: give --output FILE (.eval, or .json for JSON); an Inspect log is a file")
    result = load_run(run_id, db)
    if format == "inspect":  # inspect_ai's own log types and writer (selfcorrect.inspect_ext.log_export)
        try:
            from .inspect_ext.log_export import write_inspect_log
        except ModuleNotFoundError as missing:
            if not (missing.name or "").startswith("inspect_ai"):
                raise
            raise UserError("--format inspect: needs inspect_ai; pip install 'selfcorrect[inspect]'") from None
        write_inspect_log(result, output)
        return
    if format == "yang2025":  # the log format of the paper's own scripts (selfcorrect.paper_logs)
        from .paper_logs import logits_log, sampling_log

        records = sampling_log(result) if result.estimation.stores_replies else logits_log(result)
    else:
        targets = {item["item_id"]: item["target"] for item in result.items}
        rows = result.estimation.rows(result)
        records = [{"run_id": result.run_id, **row.to_json(), "target": targets[row.item_id]} for row in rows]
    handle = io.StringIO(newline="")  # all of it built before the file is written
    if format in ("jsonl", "yang2025"):
        for record in records:
            handle.write(json.dumps(record) + "\n")
    elif format == "json":
        json.dump(records, handle)
    else:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]) if records else ["run_id"])
        writer.writeheader()
        for record in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.items()})
    if output is None:
        sys.stdout.write(handle.getvalue())
    else:
        write_atomically(output, handle.getvalue())
