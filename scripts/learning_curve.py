"""Learning curve of a staged training campaign: validation PSNR against compute.

Reads the training logs (``MODEL.log.jsonl``) of the stages in order and draws
the validation PSNR of the full MOL reconstruction, and of CG-SENSE on the same
validation problems, against the cumulative core-hours of the campaign
(wall-clock seconds × torch threads of each invocation, so that a stage resumed with
another thread count is counted right). Logs written before
``elapsed_s`` existed fall back to the sum of the step times (validation time
not counted); the table says which. A stage that started from an earlier step
of the stage before it (``LABEL=LOG@STEP``) is drawn from that step's clock.

    python scripts/learning_curve.py stage0=runs/s0lr/s0lr.log.jsonl \
        stage1=runs/s1lr/s1lr.log.jsonl --png card_curve.png --markdown
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def read_stage(path: Path) -> tuple[list[dict], bool]:
    """Validation points (step, core-hours within the stage, PSNRs) of one log, and whether
    the clock is the run's wall clock (else summed step times).

    Each invocation (a ``start`` record) is a segment: within it the wall clock is the
    difference of ``elapsed_s`` (validation included), times the invocation's torch
    threads; without ``elapsed_s`` (logs from before it existed) the step times are
    summed."""
    recs = _records(path)
    wall = all("elapsed_s" in r for r in recs if "loss" in r)
    points = []
    for r, core_s in _clocked(recs):
        if r.get("val_psnr") is not None:
            points.append({"step": int(r["step"]), "hours": core_s / 3600.0,
                           "psnr": float(r["val_psnr"]), "ssim": float(r["val_ssim"]),
                           "sense": float(r["val_sense_psnr"]),
                           "iterations": float(r["val_iterations"])})
    return points, wall


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clocked(recs: list[dict]) -> list[tuple[dict, float]]:
    """Every record with the stage's core-seconds after it (see :func:`read_stage`)."""
    out, core, last, threads = [], 0.0, None, 1
    for r in recs:
        if r.get("event") == "start":
            last, threads = None, int(r.get("threads", 1))
        if "loss" in r:
            if "elapsed_s" in r:
                now = float(r["elapsed_s"])
                if last is None:
                    last = now - float(r.get("step_s", 0.0))
                core += (now - last) * threads
                last = now
            else:
                core += float(r.get("step_s", 0.0)) * threads
        out.append((r, core))
    return out


def campaign(stages: list[tuple[str, Path, int | None]]) -> list[dict]:
    """The stages' validation points on one clock. A stage given a step (``LABEL=LOG@STEP``)
    started from that step of the stage before it (a branch: its clock starts there);
    otherwise it follows the end of the stage before it."""
    rows: list[dict] = []
    offset = 0.0
    previous: list[dict] = []
    for label, path, branch in stages:
        points, wall = read_stage(path)
        start = offset
        if branch is not None:
            at = [r for r in previous if r["step"] <= branch]
            start = at[-1]["core_hours"] if at else 0.0
        mine = [{**p, "stage": label, "core_hours": start + p["hours"],
                 "clock": "wall" if wall else "steps"} for p in points]
        rows.extend(mine)
        previous = mine
        if mine:
            offset = mine[-1]["core_hours"]
    return rows


def spent_core_hours(stages: list[tuple[str, Path, int | None]]) -> float:
    """All the compute the stages' logs record (core-hours), the steps after a branch
    point included: what the campaign cost, not only the path to the last model."""
    total = 0.0
    for _, path, _ in stages:
        clocked = _clocked(_records(path))
        total += (clocked[-1][1] if clocked else 0.0) / 3600.0
    return total


def draw(rows: list[dict], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 720, 400, 60, 20, 30, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [r["core_hours"] for r in rows] or [0.0, 1.0]
    ys = [v for r in rows for v in (r["psnr"], r["sense"])] or [0.0, 1.0]
    x0, x1 = 0.0, max(max(xs), 1e-3) * 1.02
    y0, y1 = min(ys) - 0.5, max(ys) + 0.5

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        yv = y0 + i * (y1 - y0) / 5
        _, yy = px(x0, yv)
        d.line([left - 4, yy, left, yy], fill="black")
        d.text((4, yy - 6), f"{yv:.1f}", fill="black")
        xv = x0 + i * (x1 - x0) / 5
        xx, _ = px(xv, y0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 12, h - bottom + 8), f"{xv:.2f}", fill="black")
    d.text((w // 2 - 60, h - 20), "core-hours (cumulative)", fill="black")
    d.text((left, 8), title + "  (validation PSNR, dB)", fill="black")
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    for k, stage in enumerate(stages):
        colour = PALETTE[k % len(PALETTE)]
        pts = [r for r in rows if r["stage"] == stage]
        d.line([px(r["core_hours"], r["psnr"]) for r in pts], fill=colour, width=2) \
            if len(pts) > 1 else None
        for r in pts:
            cx, cy = px(r["core_hours"], r["psnr"])
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            sx, sy = px(r["core_hours"], r["sense"])
            d.line([sx - 3, sy, sx + 3, sy], fill=(120, 120, 120), width=2)
        d.text((left + 10, top + 8 + 14 * k), f"MOL, {stage}", fill=colour)
    d.text((left + 10, top + 8 + 14 * len(stages)), "- CG-SENSE (same problems)",
           fill=(120, 120, 120))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def markdown(rows: list[dict]) -> str:
    out = ["| stage | step | core-hours | MOL PSNR | MOL SSIM | CG-SENSE PSNR | MOL iterations |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = "" if r["clock"] == "wall" else "*"
        out.append(f"| {r['stage']} | {r['step']} | {r['core_hours']:.2f}{mark} | {r['psnr']:.2f} | "
                   f"{r['ssim']:.4f} | {r['sense']:.2f} | {r['iterations']:.1f} |")
    if any(r["clock"] != "wall" for r in rows):
        out.append("\n\\* summed step times (validation time not counted)")
    return "\n".join(out)


def parse_stage(item: str) -> tuple[str, Path, int | None]:
    """``LABEL=LOG.jsonl[@STEP]`` (or a bare path) → (label, path, branch step)."""
    label, _, rest = item.partition("=")
    if not rest:
        label, rest = Path(item).stem, item
    path, _, step = rest.partition("@")
    return label, Path(path), int(step) if step else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="+",
                    help="LABEL=LOG.jsonl in training order; LABEL=LOG.jsonl@STEP for a stage that "
                         "started from STEP of the main line before it (a branch)")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--title", default="learning curve")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    stages = [parse_stage(item) for item in args.stages]
    rows = campaign(stages)
    if args.png:
        draw(rows, args.png, args.title)
    if args.markdown or not args.png:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
