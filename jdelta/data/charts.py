"""Procedural charts, tables and receipts with questions whose answers are known exactly.

Every record is drawn with PIL from data sampled by a per-record RNG (``seed``, ``index``), so
a dataset is reproducible and any record can be regenerated alone. The underlying data
(labels, values, question parameters) is kept in ``record.meta`` so answers can be recomputed
without looking at pixels, and each question carries its evidence as cue boxes plus an exact
text hint (ViCuR's privileged cue). VA-OPD's detail-removed view of any record's image is
:func:`jdelta.data.image_processor.pixelate`.

Kinds: ``bar``, ``line``, ``pie``, ``table``, ``receipt``. Question families (``FAMILIES``):
value lookup, argmax, argmin, comparison, difference, sum, counting, trend, table cell, total.
``difficulty`` (1 easy .. 3 hard, globally or per family) sets the number of items, the value
precision and how much arithmetic the question needs.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jdelta.data.records import Cues, PromptRecord

FAMILIES: tuple[str, ...] = (
    "value_lookup",
    "argmax",
    "argmin",
    "comparison",
    "difference",
    "sum",
    "counting",
    "trend",
    "table_cell",
    "total",
)
# Which kinds of image can carry each family.
FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    "value_lookup": ("bar", "line", "pie", "receipt"),
    "argmax": ("bar", "line", "pie", "table"),
    "argmin": ("bar", "line", "pie"),
    "comparison": ("bar", "pie"),
    "difference": ("bar", "line"),
    "sum": ("bar", "table"),
    "counting": ("bar", "receipt"),
    "trend": ("line",),
    "table_cell": ("table",),
    "total": ("receipt",),
}
KINDS: tuple[str, ...] = ("bar", "line", "pie", "table", "receipt")

CATEGORY_LABELS = (
    "Apple",
    "Pear",
    "Plum",
    "Fig",
    "Kiwi",
    "Lime",
    "Mango",
    "Peach",
    "Grape",
    "Lemon",
    "Melon",
    "Date",
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
CITIES = ("Oslo", "Lima", "Rome", "Kyiv", "Pune", "Doha", "Baku", "Bern", "Cork")
COLUMNS = ("Q1", "Q2", "Q3", "Q4", "Q5")
ITEMS = ("Coffee", "Bagel", "Tea", "Muffin", "Juice", "Salad", "Soup", "Cookie", "Water", "Toast")
TITLES = {
    "bar": ("Fruit sales", "Units sold", "Stock level"),
    "line": ("Monthly visitors", "Revenue", "Rainfall"),
    "pie": ("Market share", "Budget split", "Survey answers"),
    "table": ("Quarterly results", "Orders"),
    "receipt": ("CORNER CAFE", "DAILY DELI", "BEAN BAR"),
}
PALETTE = (
    (66, 133, 244),
    (219, 68, 55),
    (244, 180, 0),
    (15, 157, 88),
    (171, 71, 188),
    (0, 172, 193),
    (255, 112, 67),
    (158, 157, 36),
    (92, 107, 192),
    (240, 98, 146),
    (121, 85, 72),
    (120, 144, 156),
)


@dataclass(frozen=True)
class GeneratorConfig:
    """Image size and per-family difficulty (1..3)."""

    width: int = 384
    height: int = 288
    difficulty: int | Mapping[str, int] = 2

    def level(self, family: str) -> int:
        d = self.difficulty.get(family, 2) if isinstance(self.difficulty, Mapping) else self.difficulty
        if d not in (1, 2, 3):
            raise ValueError(f"difficulty for {family!r} must be 1, 2 or 3, got {d!r}")
        return int(d)


def format_number(x: float, decimals: int = 1) -> str:
    """Canonical answer text: integers without a decimal point, otherwise ``decimals`` places."""
    x = round(float(x), decimals)
    if decimals == 1 and x == int(x):
        return str(int(x))
    return f"{x:.{decimals}f}"


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# ----------------------------------------------------------------------------- data


def _unique_values(rng: np.random.Generator, n: int, level: int) -> list[float]:
    """``n`` distinct values; integers at levels 1-2, one decimal at level 3."""
    if level == 1:
        return [float(v) for v in rng.choice(np.arange(5, 51), n, replace=False)]
    if level == 2:
        return [float(v) for v in rng.choice(np.arange(1, 101), n, replace=False)]
    return [float(v) / 10 for v in rng.choice(np.arange(5, 1000), n, replace=False)]


def _n_items(rng: np.random.Generator, level: int, base: tuple[int, int, int]) -> int:
    return int(base[level - 1] + rng.integers(0, 2))


def _series_data(rng, kind: str, level: int) -> dict:
    n = _n_items(rng, level, (3, 5, 8))
    if kind == "line":
        start = int(rng.integers(0, 12 - n + 1))
        labels = list(MONTHS[start : start + n])
    else:
        labels = [str(s) for s in rng.choice(CATEGORY_LABELS, n, replace=False)]
    return {"labels": labels, "values": _unique_values(rng, n, level)}


def _pie_data(rng, level: int) -> dict:
    n = _n_items(rng, level, (3, 4, 6))
    labels = [str(s) for s in rng.choice(CATEGORY_LABELS, n, replace=False)]
    while True:  # integer percentages summing to 100, all distinct and >= 3
        w = rng.dirichlet(np.ones(n) * 2.0) * 100
        p = np.floor(w).astype(int)
        p[np.argsort(-(w - p))[: 100 - p.sum()]] += 1
        if p.min() >= 3 and len(set(p.tolist())) == n:
            return {"labels": labels, "values": [float(v) for v in p]}


def _table_data(rng, level: int) -> dict:
    r, c = _n_items(rng, level, (2, 3, 5)), (2, 3, 4)[level - 1]
    rows = [str(s) for s in rng.choice(CITIES, r, replace=False)]
    cols = list(COLUMNS[:c])
    flat = _unique_values(rng, r * c, min(level, 2) if level < 3 else 3)
    return {"rows": rows, "columns": cols, "cells": [flat[i * c : (i + 1) * c] for i in range(r)]}


def _receipt_data(rng, level: int) -> dict:
    k = _n_items(rng, level, (2, 4, 6))
    items = [str(s) for s in rng.choice(ITEMS, k, replace=False)]
    qty = [1] * k if level == 1 else [int(q) for q in rng.integers(1, 5, k)]
    cents = rng.integers(1, 10, k) * 100 if level == 1 else rng.integers(10, 200, k) * 5
    return {
        "items": items,
        "qty": qty,
        "unit_price": [int(c) / 100 for c in cents],
        "show_line_amounts": level < 3,
    }


# ----------------------------------------------------------------------------- drawing


class _Canvas:
    def __init__(self, cfg: GeneratorConfig, title: str):
        self.w, self.h = cfg.width, cfg.height
        self.image = Image.new("RGB", (self.w, self.h), (255, 255, 255))
        self.draw = ImageDraw.Draw(self.image)
        self.fs = max(8, self.h // 24)
        self.font = _font(self.fs)
        self.title_font = _font(int(self.fs * 1.3))
        self.draw.text((self.w / 2, 4), title, fill=(0, 0, 0), font=self.title_font, anchor="ma")
        self.top = 8 + int(self.fs * 1.6)

    def text(self, xy, s: str, anchor: str = "la", fill=(0, 0, 0)) -> tuple[float, float, float, float]:
        self.draw.text(xy, s, fill=fill, font=self.font, anchor=anchor)
        return tuple(float(v) for v in self.draw.textbbox(xy, s, font=self.font, anchor=anchor))

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=False, compress_level=1)
        return buf.getvalue()


def _union(*boxes) -> tuple[float, float, float, float]:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _axis_max(values: Sequence[float]) -> float:
    top = max(values) * 1.15
    step = 10 ** math.floor(math.log10(top))
    return math.ceil(top / step) * step


def _draw_series(c: _Canvas, data: dict, kind: str) -> list[tuple[float, ...]]:
    """Bar or line chart; returns one evidence box per item (mark + its value and label text)."""
    labels, values = data["labels"], data["values"]
    left, right, bottom = int(c.fs * 3.2), c.w - 8, c.h - int(c.fs * 1.8)
    top = c.top + c.fs + 2
    ymax = _axis_max(values)
    c.draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=1)
    for t in range(5):
        v = ymax * t / 4
        y = bottom - (bottom - top) * t / 4
        c.draw.line([(left - 3, y), (left, y)], fill=(0, 0, 0))
        c.text((left - 5, y), format_number(v), anchor="rm", fill=(90, 90, 90))
    slot = (right - left) / len(values)
    boxes, points = [], []
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        cx = left + slot * (i + 0.5)
        y = bottom - (bottom - top) * v / ymax
        if kind == "bar":
            bw = slot * 0.6
            mark = (cx - bw / 2, y, cx + bw / 2, bottom)
            c.draw.rectangle(mark, fill=PALETTE[i % len(PALETTE)])
        else:
            mark = (cx - 3, y - 3, cx + 3, y + 3)
            points.append((cx, y))
        vbox = c.text((cx, y - 4), format_number(v), anchor="md")
        lbox = c.text((cx, bottom + 3), lab, anchor="ma")
        boxes.append(_union(mark, vbox, lbox))
    if kind == "line":
        c.draw.line(points, fill=PALETTE[0], width=2)
        for cx, y in points:
            c.draw.ellipse((cx - 3, y - 3, cx + 3, y + 3), fill=PALETTE[1])
    return boxes


def _draw_pie(c: _Canvas, data: dict) -> list[tuple[float, ...]]:
    labels, values = data["labels"], data["values"]
    size = min(c.h - c.top - 8, int(c.w * 0.55))
    x0, y0 = 8, c.top + (c.h - c.top - size) // 2
    cx, cy, r = x0 + size / 2, y0 + size / 2, size / 2
    start, boxes = -90.0, []
    lx = x0 + size + 12
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        end = start + 360 * v / 100
        c.draw.pieslice(
            (x0, y0, x0 + size, y0 + size),
            start,
            end,
            fill=PALETTE[i % len(PALETTE)],
            outline=(255, 255, 255),
        )
        angles = np.radians(np.linspace(start, end, 16))
        xs, ys = np.r_[cx, cx + r * np.cos(angles)], np.r_[cy, cy + r * np.sin(angles)]
        wedge = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
        ly = c.top + 6 + i * (c.fs + 6)
        c.draw.rectangle((lx, ly, lx + c.fs, ly + c.fs), fill=PALETTE[i % len(PALETTE)])
        tbox = c.text((lx + c.fs + 4, ly), f"{lab}: {format_number(v)}%")
        boxes.append([wedge, _union((lx, ly, lx + c.fs, ly + c.fs), tbox)])
        start = end
    return boxes


def _draw_table(c: _Canvas, data: dict) -> list[list[tuple[float, ...]]]:
    rows, cols, cells = data["rows"], data["columns"], data["cells"]
    n_r, n_c = len(rows) + 1, len(cols) + 1
    x0, y0, x1 = 8, c.top + 4, c.w - 8
    row_h = min((c.h - y0 - 8) / n_r, c.fs * 2.2)
    col_w = (x1 - x0) / n_c
    boxes = []
    for i in range(n_r):
        row_boxes = []
        for j in range(n_c):
            box = (x0 + j * col_w, y0 + i * row_h, x0 + (j + 1) * col_w, y0 + (i + 1) * row_h)
            fill = (230, 230, 230) if i == 0 or j == 0 else (255, 255, 255)
            c.draw.rectangle(box, fill=fill, outline=(0, 0, 0))
            s = (
                ""
                if i == j == 0
                else cols[j - 1]
                if i == 0
                else rows[i - 1]
                if j == 0
                else format_number(cells[i - 1][j - 1])
            )
            c.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), s, anchor="mm")
            row_boxes.append(box)
        boxes.append(row_boxes)
    return boxes  # [row+1][col+1], header row and column included


def _draw_receipt(c: _Canvas, data: dict) -> list[tuple[float, ...]]:
    x0, x1 = int(c.w * 0.12), int(c.w * 0.88)
    c.draw.rectangle((x0 - 6, c.top - 2, x1 + 6, c.h - 4), outline=(160, 160, 160))
    y = c.top + 4
    boxes = []
    for name, q, p in zip(data["items"], data["qty"], data["unit_price"], strict=True):
        left = c.text((x0, y), f"{q} x {name} @ {p:.2f}")
        parts = [left]
        if data["show_line_amounts"]:
            parts.append(c.text((x1, y), f"{q * p:.2f}", anchor="ra"))
        boxes.append(_union(*parts))
        y += c.fs + 6
    c.draw.line([(x0, y + 2), (x1, y + 2)], fill=(0, 0, 0))
    c.text((x0, y + 8), "Thank you!", fill=(90, 90, 90))
    return boxes


# ----------------------------------------------------------------------------- questions


def _pick(rng, seq, k=1):
    idx = rng.choice(len(seq), k, replace=False)
    return [int(i) for i in idx]


def _locate_hint(mark: str, labels, values, i: int, unit: str) -> str:
    """Where the asked-for mark is and what its neighbours read: a cue that never states its own value
    (positions in words, so no number in the hint can be mistaken for the answer)."""
    near = [j for j in (i - 1, i + 1) if 0 <= j < len(labels)]
    if len(near) == 2:
        where = f"sits between '{labels[near[0]]}' and '{labels[near[1]]}'"
    elif near:
        where = f"is at the {'start' if i == 0 else 'end'}, next to '{labels[near[0]]}'"
    else:
        where = "is the only one"
    beside = " and ".join(f"'{labels[j]}' reads {format_number(values[j])}{unit}" for j in near)
    return f"the {mark} '{labels[i]}' {where}" + (f"; {beside}" if beside else "")


def _series_question(rng, family: str, kind: str, data: dict, level: int, boxes) -> tuple:
    labels, values = data["labels"], data["values"]
    mark = {"bar": "bar labelled", "line": "point at", "pie": "slice"}[kind]
    unit = "%" if kind == "pie" else ""
    what = "share" if kind == "pie" else "value"
    if family == "value_lookup":
        (i,) = _pick(rng, labels)
        q = f"What is the {what} of '{labels[i]}'" + (" in percent?" if kind == "pie" else "?")
        return (
            q,
            {"label": labels[i]},
            [i],
            _locate_hint(mark, labels, values, i, unit),
        )
    if family in ("argmax", "argmin"):
        order = np.argsort(values)[::-1] if family == "argmax" else np.argsort(values)
        i = int(order[0])
        word = "highest" if family == "argmax" else "lowest"
        noun = {"bar": "bar", "line": "month", "pie": "slice"}[kind]
        return (
            f"Which {noun} has the {word} {what}?",
            {},
            [i],
            f"the {noun}s read " + ", ".join(f"'{lab}' = {format_number(v)}{unit}" for lab, v in zip(labels, values, strict=True)),
        )
    if family == "comparison":
        i, j = _pick(rng, labels, 2)
        return (
            f"Is the {what} of '{labels[i]}' greater than the {what} of '{labels[j]}'?",
            {"a": labels[i], "b": labels[j]},
            [i, j],
            f"'{labels[i]}' reads {format_number(values[i])}{unit} and '{labels[j]}' reads {format_number(values[j])}{unit}",
        )
    if family == "difference":
        i, j = _pick(rng, labels, 2)
        return (
            f"What is the difference between the {what}s of '{labels[i]}' and '{labels[j]}'?",
            {"a": labels[i], "b": labels[j]},
            [i, j],
            f"'{labels[i]}' reads {format_number(values[i])} and '{labels[j]}' reads {format_number(values[j])}",
        )
    if family == "sum":
        k = min(len(labels), level + 1)
        idx = sorted(_pick(rng, labels, k))
        names = ", ".join(f"'{labels[i]}'" for i in idx[:-1]) + f" and '{labels[idx[-1]]}'"
        return (
            f"What is the sum of the values of {names}?",
            {"labels": [labels[i] for i in idx]},
            idx,
            "the values read " + ", ".join(f"'{labels[i]}' = {format_number(values[i])}" for i in idx),
        )
    if family == "counting":
        # The threshold is one of the plotted values, so it is printed on the chart; "greater" is strict.
        threshold = float(sorted(values)[int(rng.integers(0, len(values) - 1))])
        idx = [i for i, v in enumerate(values) if v > threshold]
        return (
            f"How many bars have a value greater than {format_number(threshold)}?",
            {"threshold": threshold},
            idx,
            "bars above the threshold: "
            + ", ".join(f"'{labels[i]}' ({format_number(values[i])})" for i in idx),
        )
    if family == "trend":
        if level == 1:
            i, j = 0, len(labels) - 1
        else:
            i, j = sorted(_pick(rng, labels, 2))
        while values[i] == values[j]:  # values are distinct, kept for safety
            j = (j + 1) % len(labels)
        return (
            f"From '{labels[i]}' to '{labels[j]}', did the value increase or decrease?",
            {"a": labels[i], "b": labels[j]},
            [i, j],
            f"the line goes from {format_number(values[i])} at '{labels[i]}' to {format_number(values[j])} at '{labels[j]}'",
        )
    raise ValueError(f"family {family!r} not supported for {kind}")


def _answer(family: str, kind: str, data: dict, params: dict) -> tuple[str, str]:
    """Exact answer and answer type from the data alone."""
    if kind in ("bar", "line", "pie"):
        labels, values = data["labels"], data["values"]
        at = {lab: v for lab, v in zip(labels, values, strict=True)}
        if family == "value_lookup":
            return format_number(at[params["label"]]), "number"
        if family == "argmax":
            return labels[int(np.argmax(values))], "text"
        if family == "argmin":
            return labels[int(np.argmin(values))], "text"
        if family == "comparison":
            return ("yes" if at[params["a"]] > at[params["b"]] else "no"), "yes_no"
        if family == "difference":
            return format_number(abs(at[params["a"]] - at[params["b"]])), "number"
        if family == "sum":
            return format_number(sum(at[lab] for lab in params["labels"])), "number"
        if family == "counting":
            return str(sum(v > params["threshold"] for v in values)), "number"
        if family == "trend":
            return ("increase" if at[params["b"]] > at[params["a"]] else "decrease"), "text"
    if kind == "table":
        rows, cols, cells = data["rows"], data["columns"], data["cells"]
        j = cols.index(params["column"])
        if family == "table_cell":
            return format_number(cells[rows.index(params["row"])][j]), "number"
        if family == "sum":
            return format_number(sum(r[j] for r in cells)), "number"
        if family == "argmax":
            return rows[int(np.argmax([r[j] for r in cells]))], "text"
    if kind == "receipt":
        if family == "total":
            cents = sum(q * round(p * 100) for q, p in zip(data["qty"], data["unit_price"], strict=True))
            return f"{cents / 100:.2f}", "number"
        if family == "counting":
            return str(len(data["items"])), "number"
        if family == "value_lookup":
            return f"{data['unit_price'][data['items'].index(params['item'])]:.2f}", "number"
    raise ValueError(f"no answer rule for family {family!r} on {kind!r}")


def answer_from_meta(meta: dict) -> tuple[str, str]:
    """Recompute ``(answer, answer_type)`` of a generated record from its ``meta``."""
    return _answer(meta["family"], meta["kind"], meta["data"], meta["params"])


def _table_question(rng, family: str, data: dict, level: int, boxes):
    rows, cols, cells = data["rows"], data["columns"], data["cells"]
    j = int(rng.integers(0, len(cols)))
    col = cols[j]
    if family == "table_cell":
        i = int(rng.integers(0, len(rows)))
        return (
            f"What is the value in row '{rows[i]}', column '{col}'?",
            {"row": rows[i], "column": col},
            [boxes[i + 1][j + 1], boxes[i + 1][0], boxes[0][j + 1]],
            f"the value is where row '{rows[i]}' crosses column '{col}'; the row's other cells read "
            + ", ".join(f"'{c}' = {format_number(cells[i][k])}" for k, c in enumerate(cols)
                        if k != j and format_number(cells[i][k]) != format_number(cells[i][j])),
        )
    column_boxes = [boxes[0][j + 1]] + [boxes[i + 1][j + 1] for i in range(len(rows))]
    listing = ", ".join(f"'{r}' = {format_number(cells[i][j])}" for i, r in enumerate(rows))
    if family == "sum":
        return (
            f"What is the total of column '{col}'?",
            {"column": col},
            column_boxes,
            f"column '{col}' reads {listing}",
        )
    if family == "argmax":
        return (
            f"Which row has the highest value in column '{col}'?",
            {"column": col},
            column_boxes,
            f"column '{col}' reads {listing}",
        )
    raise ValueError(f"family {family!r} not supported for table")


def _receipt_question(rng, family: str, data: dict, level: int, boxes):
    items, qty, price = data["items"], data["qty"], data["unit_price"]
    if family == "total":
        return (
            "What is the total amount to pay for this receipt?",
            {},
            list(boxes),
            "the line items are "
            + ", ".join(f"{q} x {n} at {p:.2f}" for n, q, p in zip(items, qty, price, strict=True)),
        )
    if family == "counting":
        return (
            "How many different items are listed on the receipt?",
            {},
            list(boxes),
            "the receipt lists " + ", ".join(items),
        )
    if family == "value_lookup":
        i = int(rng.integers(0, len(items)))
        return (
            f"What is the unit price of {items[i]}?",
            {"item": items[i]},
            [boxes[i]],
            f"find the line naming '{items[i]}'"
            + (f" (after '{items[i - 1]}')" if i > 0 else " (the first line)")
            + "; each line reads 'quantity x item @ unit price'",
        )
    raise ValueError(f"family {family!r} not supported for receipt")


# ----------------------------------------------------------------------------- records


def generate_record(
    index: int, seed: int, family: str, *, config: GeneratorConfig | None = None, kind: str | None = None
) -> PromptRecord:
    """Record ``index`` of the dataset with ``seed``, asking a ``family`` question (kind drawn if None)."""
    cfg = config or GeneratorConfig()
    if family not in FAMILY_KINDS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    rng = np.random.default_rng([seed, index, FAMILIES.index(family)])
    kind = kind or str(rng.choice(FAMILY_KINDS[family]))
    if kind not in FAMILY_KINDS[family]:
        raise ValueError(f"family {family!r} cannot be asked of a {kind} (allowed: {FAMILY_KINDS[family]})")
    level = cfg.level(family)
    c = _Canvas(cfg, str(rng.choice(TITLES[kind])))
    if kind in ("bar", "line"):
        data = _series_data(rng, kind, level)
        item_boxes = _draw_series(c, data, kind)
        q, params, idx, hint = _series_question(rng, family, kind, data, level, item_boxes)
        boxes = [item_boxes[i] for i in idx]
    elif kind == "pie":
        data = _pie_data(rng, level)
        item_boxes = _draw_pie(c, data)
        q, params, idx, hint = _series_question(rng, family, kind, data, level, item_boxes)
        boxes = [b for i in idx for b in item_boxes[i]]
    elif kind == "table":
        data = _table_data(rng, level)
        q, params, boxes, hint = _table_question(rng, family, data, level, _draw_table(c, data))
    else:
        data = _receipt_data(rng, level)
        q, params, boxes, hint = _receipt_question(rng, family, data, level, _draw_receipt(c, data))
    meta = {"kind": kind, "family": family, "difficulty": level, "data": data, "params": params}
    answer, answer_type = _answer(family, kind, data, params)
    if answer_type == "number":
        q += " Answer with a number."
    elif answer_type == "yes_no":
        q += " Answer yes or no."
    return PromptRecord(
        id=f"synth-{seed}-{index:07d}",
        images=[c.png()],
        question=q,
        answer=answer,
        answer_type=answer_type,
        category=kind,
        family=family,
        cues=Cues(boxes=[(0, *(round(float(v), 1) for v in b)) for b in boxes], hint=hint),
        provenance={
            "generator": "jdelta.data.charts",
            "seed": seed,
            "index": index,
            "width": cfg.width,
            "height": cfg.height,
        },
        meta=meta,
    )


def family_sequence(
    n: int, seed: int, families: Sequence[str] | None, family_weights: Mapping[str, float] | None
) -> list[str]:
    """The question family of each of the ``n`` records (seeded draw by ``family_weights``)."""
    fams = list(families) if families is not None else list(family_weights or FAMILIES)
    for f in fams:
        if f not in FAMILY_KINDS:
            raise ValueError(f"unknown family {f!r}; known: {FAMILIES}")
    w = np.asarray([float((family_weights or {}).get(f, 1.0)) for f in fams])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"family weights must be >= 0 with a positive sum, got {dict(zip(fams, w, strict=True))}"
        )
    rng = np.random.default_rng([seed, 0x5EED])
    return [fams[i] for i in rng.choice(len(fams), n, p=w / w.sum())]


def iter_records(
    n: int,
    seed: int,
    families: Sequence[str] | None = None,
    family_weights: Mapping[str, float] | None = None,
    difficulty: int | Mapping[str, int] = 2,
    *,
    width: int = 384,
    height: int = 288,
    start: int = 0,
) -> Iterator[PromptRecord]:
    """Yield records ``start .. n-1`` of the dataset defined by the arguments (see :func:`generate_records`)."""
    cfg = GeneratorConfig(width=width, height=height, difficulty=difficulty)
    for i, fam in enumerate(family_sequence(n, seed, families, family_weights)):
        if i >= start:
            yield generate_record(i, seed, fam, config=cfg)


def generate_records(
    n: int,
    seed: int,
    families: Sequence[str] | None = None,
    family_weights: Mapping[str, float] | None = None,
    difficulty: int | Mapping[str, int] = 2,
    *,
    width: int = 384,
    height: int = 288,
) -> list[PromptRecord]:
    """``n`` generated records, deterministic in all arguments.

    families: the question families to draw from (default all ``FAMILIES``); family_weights:
    relative frequency per family (missing ones weigh 1), which is how targeted synthesis steers
    the mix; difficulty: 1..3 for all families or a mapping family -> level.
    """
    return list(iter_records(n, seed, families, family_weights, difficulty, width=width, height=height))


def corpus_text(records: Sequence[PromptRecord]) -> Iterator[str]:
    """Text for training the demo tokenizer: questions, answers, hints and chart labels."""
    for r in records:
        yield r.question
        if r.answer is not None:
            yield r.answer
        if r.cues is not None:
            yield r.cues.hint
