"""Dataset manifests: the CSV that lists a cohort's scans and their tabular columns.

A manifest has one row per scan. Columns:

* ``image`` (required): the scan, NIfTI or NRRD, in the model's contrast;
* ``t1``, ``brain_mask``, ``lesion_mask`` (optional): a T1 scan (used instead of ``image`` by a T1
  model), a brain mask and a lesion mask of the scan;
* tabular columns that :func:`~CounterfactualGenLib.text.prompts.row_to_prompt` turns into the
  row's prompt (PRISM stage 1): by default ``lesion_ml``, ``diagnosis``, ``age``, ``sex``, ``edss``.

Relative paths are relative to the manifest's own folder, never to the working directory.
:func:`read_manifest` checks the whole table before anything trains on it and refuses it with
one message that lists every problem it found (up to :data:`MAX_LISTED` of each kind):
unknown columns, missing files, rows that give no prompt, and a disease attribute with fewer
than two classes (nothing for the model to contrast). Classes no row falls in are reported
as warnings, and so are lesion volumes too large to be in ml. It reads what spreadsheet programs
write: a UTF-8 byte-order mark, Windows-1252 or UTF-16 text, ``;`` or tab as the separator (with
``;``, decimal commas), spaces around headers and cells, a trailing separator, blank lines;
column names are matched without regard to case, and cells such as ``NA``, ``n/a`` or ``-`` count
as not recorded (:data:`~CounterfactualGenLib.text.prompts.MISSING_VALUES`).

Which clauses make the prompt is set by a :class:`~CounterfactualGenLib.text.prompts.PromptConfig`,
built from a training config's ``data.prompts`` by :func:`prompt_config_from_dict`. Without
one, the manifest's own columns decide: a lesion-volume column gives the lesion-load clause, a
diagnosis column the diagnosis clause, age/sex and EDSS columns their optional clauses. Each row
must then name a lesion load or a diagnosis.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import InputError
from .text.prompts import (
    DIAGNOSIS_CLASSES,
    LESION_LOAD_CLASSES,
    LesionLoadThresholds,
    PromptConfig,
    classify_prompt,
    row_to_prompt,
)

__all__ = ["Manifest", "ManifestRow", "PATH_COLUMNS", "read_manifest", "prompt_config_from_dict"]

#: Columns that hold file paths (``image`` is required).
PATH_COLUMNS = ("image", "t1", "brain_mask", "lesion_mask")
#: A lesion volume above this (ml) is warned about: probably mm³ (a whole brain is about 1200 ml).
MAX_PLAUSIBLE_LESION_ML = 300.0
#: How many problems of each kind an error lists before it says "… and N more".
MAX_LISTED = 10

_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")
_PROMPT_KEYS = {"clauses", "optional_clauses", "columns", "thresholds_ml", "diagnosis_aliases"}
_COLUMN_KEYS = {"lesion": "lesion_column", "diagnosis": "diagnosis_column", "age": "age_column",
                "sex": "sex_column", "edss": "edss_column"}
_THRESHOLD_KEYS = {"none": "none_max_ml", "minimal": "minimal_max_ml", "moderate": "moderate_max_ml"}


@dataclass(frozen=True)
class ManifestRow:
    """One checked row: absolute paths, its prompt, and the classes the prompt names."""

    line: int
    image: Path
    t1: Path | None
    brain_mask: Path | None
    lesion_mask: Path | None
    prompt: str
    lesion_load: str | None
    diagnosis: str | None
    lesion_ml: float | None = None  # the table's lesion volume, where the prompt uses it

    def scan(self, contrast: str) -> Path:
        """The scan to train a model of ``contrast`` on: the ``t1`` column for a T1 model when given."""
        return self.t1 if contrast.upper() == "T1" and self.t1 is not None else self.image


@dataclass
class Manifest:
    """A checked manifest: its rows, the prompt configuration used, and the class counts."""

    path: Path
    rows: list[ManifestRow]
    prompt_config: PromptConfig
    warnings: list[str] = field(default_factory=list)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Rows per lesion-load class and per diagnosis, for the attributes the prompts name."""
        out: dict[str, dict[str, int]] = {}
        for attr, classes in (("lesion_load", LESION_LOAD_CLASSES), ("diagnosis", DIAGNOSIS_CLASSES)):
            counts = Counter(getattr(r, attr) for r in self.rows if getattr(r, attr) is not None)
            if counts:
                out[attr] = {c: counts.get(c, 0) for c in classes}
        return out

    def summary(self) -> str:
        """One line for logs: rows, clauses and class counts."""
        cfg = self.prompt_config
        counts = "; ".join(f"{attr}: " + ", ".join(f"{c} {n}" for c, n in per.items())
                           for attr, per in self.class_counts().items())
        clauses = list(cfg.clauses) + [f"{c} (optional)" for c in cfg.optional_clauses]
        return f"Manifest {self.path}: {len(self.rows)} scans; prompt clauses {clauses}; {counts}."


def prompt_config_from_dict(d: Mapping[str, Any] | None, header: Sequence[str] | None = None) -> PromptConfig | None:
    """A :class:`PromptConfig` from a config's ``data.prompts`` (``None`` → ``None``: the columns decide).

    Keys: ``clauses`` and ``optional_clauses`` (lists of lesion_load, diagnosis, age_sex, edss),
    ``columns`` ({"lesion", "diagnosis", "age", "sex", "edss"} → column name),
    ``thresholds_ml`` ({"none", "minimal", "moderate"} → the largest volume in ml of that class),
    ``diagnosis_aliases`` ({spelling → CN/MCI/AD}). Without ``clauses`` and ``optional_clauses``
    the clauses are those whose columns ``header`` has, as without ``data.prompts``. Example::

        {"columns": {"lesion": "t2_volume", "diagnosis": "dx"}, "thresholds_ml": {"minimal": 3, "moderate": 10}}
    """
    if d is None:
        return None
    _refuse_unknown("data.prompts", d, _PROMPT_KEYS)
    kwargs: dict[str, Any] = {}
    for key in ("clauses", "optional_clauses"):
        if key in d:
            if not isinstance(d[key], (list, tuple)) or not all(isinstance(c, str) for c in d[key]):
                raise InputError(f"data.prompts.{key} must be a list of clause names, e.g. [\"diagnosis\"]; "
                                 f"got {d[key]!r}.")
            kwargs[key] = tuple(d[key])
    columns = d.get("columns") or {}
    _refuse_unknown("data.prompts.columns", columns, set(_COLUMN_KEYS))
    kwargs.update({_COLUMN_KEYS[k]: str(v).strip().lower() for k, v in columns.items()})
    thresholds = d.get("thresholds_ml") or {}
    _refuse_unknown("data.prompts.thresholds_ml", thresholds, set(_THRESHOLD_KEYS))
    if thresholds:
        try:
            values = {_THRESHOLD_KEYS[k]: float(v) for k, v in thresholds.items()}
        except (TypeError, ValueError):
            raise InputError(f"data.prompts.thresholds_ml must map classes to numbers of ml; got {dict(thresholds)}."
                             ) from None
        kwargs["thresholds"] = LesionLoadThresholds(**values)
    aliases = d.get("diagnosis_aliases") or {}
    if not isinstance(aliases, Mapping):
        raise InputError(f"data.prompts.diagnosis_aliases must map spellings to CN/MCI/AD; got {aliases!r}.")
    kwargs["diagnosis_aliases"] = {str(k).strip().upper(): str(v).strip().upper() for k, v in aliases.items()}
    if "clauses" not in kwargs and "optional_clauses" not in kwargs:
        if header is None:
            raise InputError("data.prompts without clauses needs the manifest's header to choose them.")
        named = PromptConfig(**{k: v for k, v in kwargs.items() if k.endswith("_column")})  # the column names
        kwargs["clauses"], kwargs["optional_clauses"] = (), _clauses_from_columns(named, header)
    return PromptConfig(**kwargs)


def _refuse_unknown(where: str, d: Mapping[str, Any], known: set[str]) -> None:
    if not isinstance(d, Mapping):
        raise InputError(f"{where} must be a JSON object; got {d!r}.")
    unknown = sorted(set(map(str, d)) - known)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; use {sorted(known)}.")


def _clauses_from_columns(cfg: PromptConfig, header: Sequence[str]) -> tuple[str, ...]:
    """The clauses whose columns (named as in ``cfg``) the manifest has, each optional; at least one
    disease clause (lesion load or diagnosis), else a clear error."""
    have = set(header)
    clauses = tuple(clause for clause, needs in (("lesion_load", (cfg.lesion_column,)),
                                                  ("diagnosis", (cfg.diagnosis_column,)),
                                                  ("age_sex", (cfg.age_column, cfg.sex_column)),
                                                  ("edss", (cfg.edss_column,)))
                    if have & set(needs))
    if not {"lesion_load", "diagnosis"} & set(clauses):
        raise InputError(f"The manifest has neither a '{cfg.lesion_column}' nor a '{cfg.diagnosis_column}' column, "
                         "so its prompts would name no disease state; add one, or name your columns in the "
                         "config's data.prompts.columns.")
    return clauses


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode Text" export
        return raw.decode("utf-16")
    for encoding in ("utf-8-sig", "cp1252"):  # Excel writes a byte-order mark, or Windows-1252
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise InputError(f"The manifest {path} is not text in UTF-8 or Windows-1252; save it as \"CSV UTF-8\".")


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (lower-case, stripped) and rows (line number, column → stripped cell) of a CSV file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"Cannot read the manifest {path}: {exc.strerror or exc}.") from None
    text = _decode(raw, path)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"The manifest {path} is empty.")
    delimiter = max((",", ";", "\t"), key=lines[0].count)  # European spreadsheets write ';'
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    table: list[tuple[int, list[str]]] = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        cells = [c.strip() for c in cells]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        table.append((reader.line_num, cells))
    header = header or []
    while header and header[-1] == "" and all(len(c) < len(header) or not c[len(header) - 1] for _, c in table):
        header.pop()  # a trailing separator on every line (spreadsheets write one): an empty last column
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise InputError(f"The manifest {path} has the column name(s) {dup} more than once in its header.")
    if "" in header:
        raise InputError(f"The manifest {path} has a column without a name (column {header.index('') + 1} of the "
                         "header); name it, or delete it if it is empty.")
    rows: list[tuple[int, dict[str, str]]] = []
    for line, cells in table:
        if len(cells) > len(header) and not any(cells[len(header):]):
            cells = cells[:len(header)]
        if len(cells) != len(header):
            raise InputError(f"The manifest {path}, line {line}: {len(cells)} cells for {len(header)} columns "
                             f"(separator '{delimiter}'; a path or value with that character must be quoted).")
        if delimiter == ";":  # the decimal comma of the spreadsheets that write ';'
            cells = [c.replace(",", ".") if _DECIMAL_COMMA.fullmatch(c) else c for c in cells]
        rows.append((line, dict(zip(header, cells))))
    if not rows:
        raise InputError(f"The manifest {path} has a header but no rows.")
    return header, rows


def _listed(problems: list[str]) -> str:
    more = len(problems) - MAX_LISTED
    return "\n  ".join(problems[:MAX_LISTED]) + (f"\n  … and {more} more" if more > 0 else "")


def read_manifest(path: str | Path, prompts: PromptConfig | Mapping[str, Any] | None = None, *,
                  ignore_columns: Sequence[str] = (), check_files: bool = True) -> Manifest:
    """Read and check a manifest (see the module doc); raise one :class:`InputError` listing every problem.

    Column names are matched without regard to case.

    Args:
        path: the CSV file (a relative path is relative to the working directory).
        prompts: which columns make the prompt: a config's ``data.prompts`` (see
            :func:`prompt_config_from_dict`), a :class:`PromptConfig`, or ``None`` = the columns
            the manifest has decide.
        ignore_columns: columns to leave out of the check for unknown columns (e.g. a subject id).
        check_files: check that every path exists (off only for tests of the table itself).
    """
    path = Path(path).expanduser().absolute()
    header, table = _read_table(path)
    if "image" not in header:
        raise InputError(f"The manifest {path} needs an 'image' column (the scan of each row); "
                         f"its columns are {header}.")
    if isinstance(prompts, PromptConfig):
        cfg = prompts
    elif prompts is None:
        cfg = PromptConfig(clauses=(), optional_clauses=_clauses_from_columns(PromptConfig(), header))
    else:
        cfg = prompt_config_from_dict(prompts, header)
    cfg = replace(cfg, **{f: getattr(cfg, f).lower() for f in _COLUMN_KEYS.values()})
    column_of = {"lesion_load": [cfg.lesion_column], "diagnosis": [cfg.diagnosis_column],
                 "age_sex": [cfg.age_column, cfg.sex_column], "edss": [cfg.edss_column]}
    absent = [f"{clause} (column {' or '.join(repr(c) for c in column_of[clause])})" for clause in cfg.clauses
              if not set(column_of[clause]) & set(header)]
    if absent:
        raise InputError(f"The manifest {path} lacks the column(s) of the required prompt clause(s) "
                         f"{', '.join(absent)}; its columns are {header}. Name your columns in data.prompts.columns, "
                         "or list the clauses you want in data.prompts.clauses (e.g. [\"diagnosis\"]).")
    ignore_columns = [str(c).strip().lower() for c in ignore_columns]
    tabular = {cfg.lesion_column, cfg.diagnosis_column, cfg.age_column, cfg.sex_column, cfg.edss_column}
    known = set(PATH_COLUMNS) | tabular | set(ignore_columns)
    unknown = [c for c in header if c not in known]
    if unknown:
        hints = [f"'{c}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(c, sorted(known), 1, 0.75))
                 else f"'{c}'" for c in unknown]
        raise InputError(f"The manifest {path} has column(s) this tool does not know: {', '.join(hints)}. "
                         f"Known: {sorted(PATH_COLUMNS)} and the prompt columns {sorted(tabular)}. Rename them, "
                         "name your columns in the config's data.prompts.columns, or list columns to leave "
                         "alone in data.ignore_columns.")
    rows: list[ManifestRow] = []
    missing: list[str] = []
    bad_rows: list[str] = []
    for line, row in table:
        paths: dict[str, Path | None] = {}
        for col in PATH_COLUMNS:
            value = (row.get(col) or "").strip()
            if not value:
                if col == "image":
                    bad_rows.append(f"line {line}: the 'image' cell is empty")
                paths[col] = None
                continue
            p = Path(value.replace("\\", "/")).expanduser()
            p = p if p.is_absolute() else path.parent / p
            paths[col] = p
            if check_files and not p.is_file():
                missing.append(f"line {line}, {col}: {p}")
        try:
            prompt = row_to_prompt(row, cfg)
        except InputError as exc:
            bad_rows.append(f"line {line}: {exc}")
            continue
        named = classify_prompt(prompt)
        if named["lesion_load"] is None and named["diagnosis"] is None:
            bad_rows.append(f"line {line}: its prompt '{prompt}' names no lesion load and no diagnosis")
            continue
        stated = None
        if named["lesion_load"] is not None and (row.get(cfg.lesion_column) or "").strip():
            stated = float(row[cfg.lesion_column])  # row_to_prompt has checked it is a number ≥ 0
        if paths["image"] is not None:
            rows.append(ManifestRow(line, paths["image"], paths["t1"], paths["brain_mask"], paths["lesion_mask"],
                                    prompt, named["lesion_load"], named["diagnosis"], stated))
    problems = []
    if missing:
        problems.append(f"{len(missing)} file(s) not found (relative paths are relative to the manifest's "
                        f"folder {path.parent}):\n  {_listed(missing)}")
    if bad_rows:
        problems.append(f"{len(bad_rows)} row(s) give no usable prompt:\n  {_listed(bad_rows)}")
    if problems:
        raise InputError(f"The manifest {path} cannot be used:\n" + "\n".join(problems))
    manifest = Manifest(path, rows, cfg)
    for attr, per in manifest.class_counts().items():
        present = [c for c, n in per.items() if n]
        if len(present) < 2:
            raise InputError(f"The manifest {path}: every row's {attr.replace('_', ' ')} is '{present[0]}', so the "
                             "model would have nothing to contrast it with; add scans of other classes.")
        empty = [c for c, n in per.items() if not n]
        if empty:
            manifest.warnings.append(f"No row of the manifest has {attr.replace('_', ' ')} {empty}: the model will "
                                     "not learn what those prompts mean.")
    used = {c for clause in (*cfg.clauses, *cfg.optional_clauses) for c in column_of[clause]}
    unused = [c for c in header if c in tabular and c not in used]
    if unused:
        manifest.warnings.append(f"Column(s) {unused} make no part of the prompts (data.prompts lists the clauses "
                                 f"{list(cfg.clauses) + list(cfg.optional_clauses)}).")
    huge = [r for r in rows if r.lesion_ml is not None and r.lesion_ml > MAX_PLAUSIBLE_LESION_ML]
    if huge:
        manifest.warnings.append(f"{len(huge)} row(s) give a lesion volume above {MAX_PLAUSIBLE_LESION_ML:g} ml (e.g. "
                                 f"line {huge[0].line}: {huge[0].lesion_ml:g}); a whole brain is about 1200 ml. Is "
                                 "the column in mm³ rather than ml?")
    dup = [p for p, n in Counter(r.image for r in rows).items() if n > 1]
    if dup:
        manifest.warnings.append(f"{len(dup)} scan(s) are listed more than once (e.g. {dup[0]}): they weigh more.")
    return manifest
