"""Table-1 and Table-2 style markdown: our rows, measured, beside the paper's, quoted.

The paper's rows are copied from its Table 1 (HDTF columns) and Table 2 (ablations on HDTF)
and always labelled as quoted: they were measured on HDTF with the authors' weights and
settings, ours on whatever test set `imgtalk eval` was given, so the two are not comparable
number for number, only in kind.
"""
from __future__ import annotations

import math

COLUMNS = {  # key, header, better
    "ssim": ("SSIM↑", "high"),
    "psnr": ("PSNR↑", "high"),
    "fid": ("FID↓", "low"),
    "lmd": ("LMD↓", "low"),
    "sync_conf": ("AVConf (LSE-C)↑", "high"),
    "sync_dist": ("LSE-D↓", "low"),
}
PROTOCOL_COLUMNS = {
    "reconstruction": ("ssim", "psnr", "fid", "lmd", "sync_conf", "sync_dist"),
    # Another audio track: no ground truth frame, so only the distribution and sync metrics.
    "cross": ("fid", "sync_conf", "sync_dist"),
}

# IMGTalk paper, Table 1, HDTF columns (SSIM, PSNR, FID, LMD, AVConf); LSE-D not reported.
PAPER_TABLE1_HDTF = {
    "Ground Truth": {"ssim": 1.0, "lmd": 0.0, "sync_conf": 8.839},
    "Wav2Lip": {"ssim": 0.718, "psnr": 26.352, "fid": 12.763, "lmd": 4.285, "sync_conf": 7.637},
    "VideoRetalking": {"ssim": 0.862, "psnr": 29.524, "fid": 11.652, "lmd": 3.735, "sync_conf": 6.847},
    "IPLAP": {"ssim": 0.798, "psnr": 24.956, "fid": 12.167, "lmd": 3.642, "sync_conf": 5.865},
    "DINet": {"ssim": 0.942, "psnr": 30.008, "fid": 7.243, "lmd": 2.190, "sync_conf": 7.275},
    "MuseTalk": {"ssim": 0.958, "psnr": 33.615, "fid": 6.792, "lmd": 2.013, "sync_conf": 7.612},
    "IMGTalk": {"ssim": 0.969, "psnr": 34.259, "fid": 6.135, "lmd": 1.785, "sync_conf": 7.697},
}
# IMGTalk paper, Table 2 (HDTF).
PAPER_TABLE2_HDTF = {
    "w/ landmark": {"ssim": 0.948, "psnr": 33.871, "fid": 6.545, "lmd": 1.976, "sync_conf": 7.058},
    "w/ 3DMM": {"ssim": 0.953, "psnr": 33.529, "fid": 6.428, "lmd": 2.116, "sync_conf": 7.160},
    "w/o RSCA": {"ssim": 0.914, "psnr": 31.246, "fid": 6.736, "lmd": 1.826, "sync_conf": 7.568},
    "w/o L_motion": {"ssim": 0.950, "psnr": 34.125, "fid": 6.207, "lmd": 2.108, "sync_conf": 6.922},
    "Ours (full)": {"ssim": 0.969, "psnr": 34.259, "fid": 6.135, "lmd": 1.785, "sync_conf": 7.697},
}


def _cell(value, skipped: bool) -> str:
    if skipped:
        return "skipped"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}"


def markdown_table(rows: dict[str, dict], protocol: str, skipped: dict[str, str], quoted: dict[str, dict],
                   quoted_label: str) -> str:
    """rows: label -> {metric: mean}. skipped: metric -> reason (shown as "skipped" in our
    rows, the reason under the table). quoted: the paper's rows, labelled `quoted_label`."""
    keys = PROTOCOL_COLUMNS[protocol]
    header = "| Method | " + " | ".join(COLUMNS[k][0] for k in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for label, values in rows.items():
        lines.append(f"| {label} | " + " | ".join(_cell(values.get(k), k in skipped) for k in keys) + " |")
    for label, values in quoted.items():
        lines.append(f"| {label} ({quoted_label}) | " + " | ".join(
            _cell(values.get(k), False) if k in values else "N/A" for k in keys) + " |")
    notes = [f"- {COLUMNS[k][0].rstrip('↑↓')}: skipped: {why}" for k, why in skipped.items() if k in keys]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def table1(rows: dict[str, dict], protocol: str, skipped: dict[str, str]) -> str:
    return markdown_table(rows, protocol, skipped, PAPER_TABLE1_HDTF, "quoted: paper Table 1, HDTF")


def table2(rows: dict[str, dict], protocol: str, skipped: dict[str, str]) -> str:
    return markdown_table(rows, protocol, skipped, PAPER_TABLE2_HDTF, "quoted: paper Table 2, HDTF")
